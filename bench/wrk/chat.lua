-- wrk script of the chatapp benchmark (bench/run.py); see bench/README.md.
--
-- Arguments after `--`, each key=value:
--   mode=get|stub|new|continue  get: GET the URL's path (S0); stub: POST a chat completion to the
--                               agent stub; new: POST /api/<user>/chat starting a conversation;
--                               continue: POST /api/<user>/chat continuing a conversation
--   data=PATH                   new: lines "user<TAB>token"; continue: "user<TAB>token<TAB>conversation_id"
--   threads=N                   wrk's -t: thread k takes conversations k, k+N, k+2N... so that two
--                               threads never send turns of the same conversation
--   request_id=PREFIX           sent as X-Request-ID (the app forwards it to the agent; the stub
--                               answers ids starting with "slow-" after 200 ms)
--   max=N                       stop the thread after N responses (a bounded number of turns)
--   token=JWT                   get: sent as Authorization: Bearer JWT (the history endpoints)
--
-- done() prints one line: BENCH_RESULT {json}, latencies in microseconds.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("thread_index", #threads - 1)
end

local requests = {}
local next_request = 1
local max_responses = nil
local responses = 0
non2xx = 0
statuses = {}

local function split(line, sep)
   local fields = {}
   for field in string.gmatch(line, "[^" .. sep .. "]+") do
      table.insert(fields, field)
   end
   return fields
end

local function read_lines(path)
   local lines = {}
   local file = assert(io.open(path, "r"))
   for line in file:lines() do
      if line ~= "" then table.insert(lines, line) end
   end
   file:close()
   return lines
end

local function headers_with(extra)
   local headers = {}
   for name, value in pairs(extra) do headers[name] = value end
   return headers
end

function init(args)
   local opts = {}
   for _, arg in ipairs(args) do
      local key, value = string.match(arg, "^([%w_]+)=(.*)$")
      if key then opts[key] = value end
   end
   local mode = opts.mode or "get"
   local index = thread_index or 0
   local thread_count = tonumber(opts.threads or "1")
   max_responses = opts.max and tonumber(opts.max) or nil
   local base = {}
   if opts.request_id then base["X-Request-ID"] = opts.request_id end

   if mode == "get" then
      local headers = headers_with(base)
      if opts.token then headers["Authorization"] = "Bearer " .. opts.token end
      table.insert(requests, wrk.format("GET", wrk.path, headers))
   elseif mode == "stub" then
      local headers = headers_with(base)
      headers["Content-Type"] = "application/json"
      local body = '{"model":"gpt-4","messages":[{"role":"user","content":"Hello from wrk"}]}'
      table.insert(requests, wrk.format("POST", wrk.path, headers, body))
   elseif mode == "new" or mode == "continue" then
      local lines = read_lines(assert(opts.data, "data=PATH is required"))
      for i, line in ipairs(lines) do
         if mode == "new" or (i - 1) % thread_count == index then
            local fields = split(line, "\t")
            local headers = headers_with(base)
            headers["Content-Type"] = "application/json"
            headers["Authorization"] = "Bearer " .. fields[2]
            local body
            if mode == "new" then
               body = '{"message":"Hello from wrk: what is a good name for a benchmark?"}'
            else
               body = '{"message":"And another question, please?","conversation_id":"' .. fields[3] .. '"}'
            end
            table.insert(requests, wrk.format("POST", "/api/" .. fields[1] .. "/chat", headers, body))
         end
      end
      assert(#requests > 0, "thread " .. index .. " has no requests to send")
   else
      error("unknown mode " .. mode)
   end
end

function request()
   local req = requests[next_request]
   next_request = next_request % #requests + 1
   return req
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
   statuses[status] = (statuses[status] or 0) + 1
   if max_responses and responses >= max_responses then
      io.stderr:write("BENCH_THREAD_DONE\n")
      io.stderr:flush()
      wrk.thread:stop()
   end
end

function done(summary, latency, requests)
   local total_non2xx = 0
   local merged = {}
   for _, thread in ipairs(threads) do
      total_non2xx = total_non2xx + thread:get("non2xx")
      for status, count in pairs(thread:get("statuses")) do
         merged[status] = (merged[status] or 0) + count
      end
   end
   local parts = {}
   for status, count in pairs(merged) do
      table.insert(parts, string.format('"%d":%d', status, count))
   end
   local errors = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
      '"timeout":%d,"status_errors":%d,"non2xx":%d,"statuses":{%s},"threads":%d,' ..
      '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes, errors.connect, errors.read, errors.write,
      errors.timeout, errors.status, total_non2xx, table.concat(parts, ","), #threads,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
