-- wrk script for the half-load latency check (benches/load/extras.sh): like the shared
-- harness's load.lua (BENCH_MODE unique|fixed), but each connection waits DELAY_MS between
-- requests, so the offered rate is about connections / (DELAY_MS + latency) instead of
-- "as fast as possible". DIRECT_AUTH sends a static Authorization (wrk straight to the
-- upstream); BENCH_AUTH sends the proxy client secret. done() prints WRK {json}.
local threads = {}
id = 0
local unique = os.getenv("BENCH_MODE") == "unique"
local delay_ms = tonumber(os.getenv("DELAY_MS") or "2")
local n, fixed = 0, nil

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local auth = os.getenv("BENCH_AUTH")
  if auth and auth ~= "" then wrk.headers["Proxy-Authorization"] = "Bearer " .. auth end
  local direct = os.getenv("DIRECT_AUTH")
  if direct and direct ~= "" then wrk.headers["Authorization"] = "Bearer " .. direct end
  fixed = wrk.format("GET", "/v1/apps/123")
end

function request()
  if not unique then return fixed end
  n = n + 1
  return wrk.format("GET", "/v1/apps/" .. (id * 1000000000 + n))
end

function delay() return delay_ms end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
