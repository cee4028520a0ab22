-- wrk script for the `apns` mode (benches/load/apns.sh): every request is a push, POST of a
-- 1 KiB JSON payload with APNs' headers, to PUSH_PATH (default the proxy's APNs mount), with
-- the proxy client secret from BENCH_AUTH (none: nginx's floor). done() prints WRK {json}.
local req = nil

function init(args)
  local headers = {
    ["Content-Type"] = "application/json",
    ["apns-topic"] = "com.example.bench",
    ["apns-push-type"] = "alert",
    ["apns-priority"] = "10",
  }
  local auth = os.getenv("BENCH_AUTH") or ""
  if auth ~= "" then headers["Proxy-Authorization"] = "Bearer " .. auth end
  local alert = string.rep("x", 1024 - 24)
  local body = '{"aps":{"alert":"' .. alert .. '"}}'
  local path = os.getenv("PUSH_PATH") or "/apns/3/device/a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
  req = wrk.format("POST", path, headers, body)
end

function request() return req end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
