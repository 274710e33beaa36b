-- wrk load script: bench/wrk/increments.lua at a fixed offered rate (an open-loop load).
--
-- Usage: wrk -t1 -cN -dD -s bench/wrk/paced.lua URL -- SCENARIO PREFIX SEED BATCH KEY RATE
--   the arguments of increments.lua (KEY may be ""), then
--   RATE      requests per second for the whole run (one wrk thread)
--
-- Closed-loop wrk sends the next request the moment an answer arrives, so it measures latency at
-- saturation. Production traffic arrives at its own pace: here the requests take slots on one
-- schedule, a slot every 1/RATE s, and a connection whose answer came early waits for its next
-- slot (wrk's delay() hook). Latency is then what a user sees at that load. A schedule that falls
-- behind (a slow answer) is not caught up by more than a second's worth of requests in a burst.
-- wrk timers have millisecond resolution: a request leaves up to a millisecond before its slot,
-- and the slots still average out to RATE. The harness reports the rate achieved beside it.

local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "increments.lua")

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } paced_timespec;
int clock_gettime(int clk_id, paced_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("paced_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local interval_ms, next_ms = 0, nil
local base_init = init

function init(args)
  base_init(args)
  local rate = tonumber(args[6] or "0") or 0
  interval_ms = rate > 0 and 1000 / rate or 0
end

function delay()
  if interval_ms == 0 then
    return 0
  end
  local now = now_ms()
  if next_ms == nil or next_ms < now - 1000 then
    next_ms = now
  end
  local wait = next_ms - now
  next_ms = next_ms + interval_ms
  if wait < 1 then
    return 0
  end
  return math.floor(wait)
end
