-- wrk script for the `sign` mode (benches/load/sign.sh): every request asks the proxy for a
-- promotional-offer signature (POST /proxy/v1/signatures/promotional-offer, a small JSON
-- body), with the proxy client secret from BENCH_AUTH. DELAY_MS (default 0) makes each
-- connection wait between requests, for the latency-at-half-of-peak check. done() prints
-- WRK {json}, as paced.lua does.
local threads = {}
id = 0
local delay_ms = tonumber(os.getenv("DELAY_MS") or "0")
local req = nil

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local auth = os.getenv("BENCH_AUTH") or ""
  local headers = {
    ["Proxy-Authorization"] = "Bearer " .. auth,
    ["Content-Type"] = "application/json",
  }
  local body = '{"product_id":"com.example.pro.monthly","offer_id":"winback-1","transaction_id":"2000000123456789"}'
  req = wrk.format("POST", "/proxy/v1/signatures/promotional-offer", headers, body)
end

function request() return req end

if delay_ms > 0 then
  function delay() return delay_ms end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
