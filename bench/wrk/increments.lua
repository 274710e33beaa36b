-- wrk load script: POST JSON increments and count what was sent and what was acknowledged.
--
-- Usage: wrk -t1 -c32 -d10 -s bench/wrk/increments.lua URL -- SCENARIO PREFIX SEED [BATCH [KEY]]
--   SCENARIO  10keys   POST /increment, cycling over PREFIX0 .. PREFIX9
--             100kkeys POST /increment, keys drawn at random from PREFIX0 .. PREFIX99999
--             10mkeys  POST /increment, keys drawn at random from 10,000,000: almost every
--                      request adds a row (per-user counters)
--             batch    POST /increments, arrays of BATCH (default 50) random keys of the 100k
--             keys:N   POST /increment, keys drawn at random from PREFIX0 .. PREFIX(N-1)
--   PREFIX    prefix of every key, distinct per run, so the database totals can be summed
--   SEED      math.randomseed, so a run is reproducible
--   KEY       API key: every request carries "Authorization: Bearer KEY" (none when absent)
--
-- Every increment has value 1, so a request is worth 1 (or BATCH) whichever response answers it, and
-- the database sum of a run's keys equals the number of increments the service accepted: the harness
-- polls for that equality to time the lag after the load. done() prints the totals as JSON:
--   BENCH_RESULT {"requests": ..., "sent": ..., "acked": ..., "acked_value": ..., ...}

local KEYSPACE = 100000
local KEYSPACE_10M = 10000000

local scenario, prefix, batch_size, path
local keyspace                   -- keys:N: N
local hot_requests = {}          -- 10keys: the ten requests, built once
local n = 0                      -- requests built by this thread
-- Per thread, and global so that done(), in the main Lua state, can read them with thread:get().
sent, acked, other, value_per_request = 0, 0, 0, 0
local threads = {}

local function json_key(i)
  return '"' .. prefix .. i .. '"'
end

function setup(thread)
  table.insert(threads, thread)
end

local function configure(args)
  scenario = args[1] or "10keys"
  prefix = args[2] or "bench-"
  local seed = tonumber(args[3] or "1")
  batch_size = tonumber(args[4] or "50")
  math.randomseed(seed)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  local api_key = args[5]
  if api_key and api_key ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. api_key
  else
    wrk.headers["Authorization"] = nil
  end
  if scenario == "10keys" then
    path, value_per_request = "/increment", 1
    for i = 0, 9 do
      hot_requests[i] = wrk.format(nil, path, nil, '{"key":' .. json_key(i) .. ',"value":1}')
    end
  elseif scenario == "100kkeys" or scenario == "10mkeys" then
    path, value_per_request = "/increment", 1
  elseif scenario:match("^keys:%d+$") then
    path, value_per_request = "/increment", 1
    keyspace = tonumber(scenario:sub(6))
  elseif scenario == "batch" then
    path, value_per_request = "/increments", batch_size
  else
    error("unknown scenario " .. scenario)
  end
end

-- wrk calls request() once in its main Lua state to check the request before any thread runs
-- init(): configure with defaults here so that call works too (its count is never reported).
configure({})

function init(args)
  configure(args)
end

function request()
  sent = sent + 1
  n = n + 1
  if scenario == "10keys" then
    return hot_requests[n % 10]
  elseif scenario == "100kkeys" then
    local body = '{"key":' .. json_key(math.random(0, KEYSPACE - 1)) .. ',"value":1}'
    return wrk.format(nil, path, nil, body)
  elseif scenario == "10mkeys" then
    local body = '{"key":' .. json_key(math.random(0, KEYSPACE_10M - 1)) .. ',"value":1}'
    return wrk.format(nil, path, nil, body)
  elseif keyspace then
    local body = '{"key":' .. json_key(math.random(0, keyspace - 1)) .. ',"value":1}'
    return wrk.format(nil, path, nil, body)
  end
  local items = {}
  for i = 1, batch_size do
    items[i] = '{"key":' .. json_key(math.random(0, KEYSPACE - 1)) .. ',"value":1}'
  end
  return wrk.format(nil, path, nil, "[" .. table.concat(items, ",") .. "]")
end

function response(status, headers, body)
  if status == 202 then
    acked = acked + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local t_sent, t_acked, t_other, t_sent_value, t_acked_value = 0, 0, 0, 0, 0
  for _, thread in ipairs(threads) do
    local per_request = thread:get("value_per_request")
    t_sent = t_sent + thread:get("sent")
    t_acked = t_acked + thread:get("acked")
    t_other = t_other + thread:get("other")
    t_sent_value = t_sent_value + thread:get("sent") * per_request
    t_acked_value = t_acked_value + thread:get("acked") * per_request
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, '
    .. '"sent": %d, "acked": %d, "other_status": %d, '
    .. '"sent_value": %d, "acked_value": %d, "latency_us": {"p50": %d, "p90": %d, "p99": %d, '
    .. '"max": %d, "mean": %.1f}, "errors": {"connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, summary.bytes, t_sent, t_acked, t_other,
    t_sent_value, t_acked_value,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
