-- Asks the API-key sidecar about each request (its decision endpoint /_sidecar/auth) with
-- HAProxy's built-in HTTP client; no other Lua library. See README.md next to this file.
--
-- Rules that hold here:
-- 1. Only a 200 answer lets the request through; it then carries the identity headers of the
--    answer and no others (haproxy.cfg deleted every client spelling before this runs).
-- 2. A request this action did not allow is not forwarded: haproxy.cfg refuses any request
--    without txn.sidecar_allowed, which only a 200 sets (a Lua error must not let one pass).
-- 3. Any other answer goes to the client as the sidecar gave it: status, JSON body and the
--    headers a client needs (WWW-Authenticate, Retry-After, RateLimit-*). No answer at all
--    (sidecar down, timeout) is 503 auth_unavailable: fail closed.

local IDENTITY = { "x-tenant-id", "x-app-id", "x-api-token-id", "x-api-token-scope" }
local PASSED_TO_CLIENT = { "content-type", "www-authenticate", "retry-after",
                           "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset" }
local UNAVAILABLE = '{"code": "auth_unavailable", "message": '
    .. '"Authentication is temporarily unavailable", "status": 503}\n'

-- Every value of a header, whatever the Lua table's first index (HAProxy counts from 0).
local function values(headers, name)
    local out = {}
    local found = headers[name]
    if found ~= nil then
        for i = 0, #found do
            if found[i] ~= nil then out[#out + 1] = found[i] end
        end
    end
    return out
end

local function decide(txn, url, timeout_ms)
    local client = txn.http:req_get_headers()
    local ask = {
        ["x-original-uri"] = { txn.f:pathq() },
        ["x-original-method"] = { txn.f:method() },
    }
    -- Every Authorization header: two of them is a 401 the sidecar decides, not us.
    local auth = values(client, "authorization")
    if #auth > 0 then ask["authorization"] = auth end
    local request_id = values(client, "x-request-id")
    if #request_id > 0 then ask["x-request-id"] = request_id end

    local res = core.httpclient():get{ url = url, headers = ask, timeout = timeout_ms }
    local answer = {}
    for name, vals in pairs(res and res.headers or {}) do
        answer[string.lower(name)] = vals
    end
    local status = res and tonumber(res.status) or 0
    local json = (values(answer, "content-type")[1] or ""):find("^application/json") ~= nil
    if status < 200 or (status >= 500 and not json) then
        -- No answer from the sidecar: the HTTP client's own error (connection refused, timeout).
        return txn:done(txn:reply{ status = 503,
            headers = { ["content-type"] = { "application/json" } }, body = UNAVAILABLE })
    end
    if status == 200 then
        for _, name in ipairs(IDENTITY) do
            local v = values(answer, name)
            if #v > 0 then txn.http:req_set_header(name, v[1]) end
        end
        -- haproxy.cfg lets through only requests marked here: a Lua error is no allow.
        txn:set_var("txn.sidecar_allowed", true)
        return
    end
    local headers = {}
    for _, name in ipairs(PASSED_TO_CLIENT) do
        local v = values(answer, name)
        if #v > 0 then headers[name] = v end
    end
    txn:done(txn:reply{ status = status, headers = headers, body = res.body or "" })
end

-- http-request lua.sidecar_auth <decision url> <timeout ms>
core.register_action("sidecar_auth", { "http-req" }, function(txn, url, timeout)
    decide(txn, url, tonumber(timeout) or 2000)
end, 2)
