-- wrk script for bench/embed_bench.py --wrk: POST one prebuilt /v1/embed JSON body (path in EMBED_BODY).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(os.getenv("EMBED_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
