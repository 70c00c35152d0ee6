-- wrk workload of the benchmark: a main app sending messages through the proxy.
-- Every request is POST /api/sess-<N>/sendText, N uniform in 1..1000 (fixed
-- seed, so every target sees the same sequence), with the router's API key and
-- a 36-byte JSON body.
math.randomseed(42)

local headers = {
  ["Content-Type"] = "application/json",
  ["X-Api-Key"] = "k",
}
local body = '{"chatId":"123@c.us","text":"hello"}'

request = function()
  local path = string.format("/api/sess-%d/sendText", math.random(1, 1000))
  return wrk.format("POST", path, headers, body)
end
