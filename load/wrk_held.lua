-- bench_mixed.py's fast clients: wrk opens every connection at once, but each connection's
-- first request waits `hold` ms: `wrk -t1 -cN ... -- HOLD_MS N` (wrk does not tell the script
-- its connection count, so it comes as the second argument). The
-- connections are thus placed on the workers while the server is idle, and latency (which
-- wrk times from each request's write) and throughput are measured only after the hold.
-- The summary is the JSON line of wrk_report.lua, loaded from this script's directory.
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "wrk_report.lua")

local hold = 1000
local held = 0
local connections = 0

init = function(args)
  hold = tonumber(args[1]) or hold
  connections = tonumber(args[2]) or 0
end

-- Called before every request once defined; only the first one per connection is held.
-- With -t1 the first `connections` calls are exactly those first requests.
delay = function()
  if held < connections then
    held = held + 1
    return hold
  end
  return 0
end
