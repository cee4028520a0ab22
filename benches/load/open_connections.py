"""Opens N keep-alive client connections to the proxy, each sending one GET (its own path,
so each is a fresh signature) and reading the whole response, then holds them all open and
prints the proxy's VmRSS / VmHWM from /proc.

    python3 open_connections.py N PROXY_PID [PORT]     # client secret: $BENCH_AUTH
"""
import asyncio
import os
import sys
import time

N = int(sys.argv[1])
PID = int(sys.argv[2])
PORT = int(sys.argv[3]) if len(sys.argv) > 3 else 18080
SECRET = os.environ.get("BENCH_AUTH", "aap_benchsecret")


def kb(key):
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k == key:
                return int(v.split()[0])
    return 0


def mem():
    out = {}
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = v.strip()
    return ", ".join(f"{k} {v}" for k, v in out.items())


async def one(i, held):
    r, w = await asyncio.open_connection("127.0.0.1", PORT)
    w.write(
        f"GET /v1/apps/{900000 + i} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Proxy-Authorization: Bearer {SECRET}\r\n\r\n".encode()
    )
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await r.readexactly(length)
    held.append(w)
    return head.split(b" ")[1]


async def main():
    print(f"before: {mem()}")
    held = []
    gate = asyncio.Semaphore(100)  # at most 100 connects in flight; all stay open after

    async def gated(i):
        async with gate:
            return await one(i, held)

    started = time.time()
    statuses = await asyncio.gather(*(gated(i) for i in range(N)))
    ok = sum(1 for s in statuses if s == b"200")
    await asyncio.sleep(1)
    fds = len(os.listdir(f"/proc/{PID}/fd"))
    print(
        f"{N} client connections open ({ok} answered 200 in {time.time() - started:.1f} s; "
        f"proxy holds {fds} fds): {mem()}"
    )
    # For scripts/loadtest.sh's table: connections answered, VmRSS in kB while all are open.
    print(f"OPEN {ok} {kb('VmRSS')}")
    for w in held:
        w.close()


asyncio.run(main())
