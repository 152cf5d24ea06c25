"""A recording MCP tool server for the agentic plan tests (operator/tests/agentic_plan.rs).

Run with the Python MCP SDK's interpreter (`$AGENTPLANE_MCP_PYTHON ci/mcp/recorder.py LOG`, or the
log path in `RECORDER_LOG`), over stdio. Every tools/call it receives is appended to LOG as one JSON
line, before its effect and flushed to disk, so a test can count side effects even across a worker
that was killed mid-plan:

    {"tool": ..., "arguments": {...}, "idempotencyKey": ..., "duplicate": bool, "pid": ...,
     "tokenSha256": ... (only when RECORDER_TOKEN is set: the SHA-256 of the injected credential)}

`idempotencyKey` is the agentplane step key the client sends in `_meta`; `duplicate` says whether a
call with the same key was received before (by this or an earlier process): such a call is answered
with the first call's result and has no new effect, which is what a deduplicating third party does.

Tools:
- `write_record(key, value)`: a side effect (the record appended to LOG);
- `delete_record(key)`: the "destructive" one, for the approval tests;
- `slow_write(key, value, seconds)`: a write whose answer takes `seconds` after its effect (logged
  at once), for suspend/kill timing: a client killed meanwhile has had the effect but not the reply.
  A repeat of a call already logged (same key) is answered at once, from the record;
- `read_records()`: what was written so far (no side effect, not logged).
"""

import asyncio
import hashlib
import json
import os
import sys

from mcp.server.mcpserver import Context, MCPServer

META_KEY = "dev.agentplane/idempotencyKey"


def log_path() -> str:
    path = os.environ.get("RECORDER_LOG") or (sys.argv[1] if len(sys.argv) > 1 else "")
    if not path:
        sys.exit("recorder.py: give the log file as the first argument or RECORDER_LOG")
    return path


LOG = log_path()
server = MCPServer("recorder")


def entries() -> list[dict]:
    try:
        with open(LOG, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def idempotency_key(ctx: Context) -> str | None:
    meta = ctx.request_context.meta
    if meta is None:
        return None
    if isinstance(meta, dict):
        return meta.get(META_KEY)
    extra = getattr(meta, "model_extra", None) or {}
    return extra.get(META_KEY) or getattr(meta, META_KEY, None)


def record(ctx: Context, tool: str, arguments: dict) -> bool:
    """Logs the call durably; returns whether its key was seen before (no new effect then)."""
    key = idempotency_key(ctx)
    duplicate = key is not None and any(e.get("idempotencyKey") == key for e in entries())
    line = {
        "tool": tool,
        "arguments": arguments,
        "idempotencyKey": key,
        "duplicate": duplicate,
        "pid": os.getpid(),
    }
    # A credential the runtime injected (an env entry with a secretRef): only its SHA-256 is
    # logged, so a test can check which value arrived without the log holding it.
    token = os.environ.get("RECORDER_TOKEN")
    if token is not None:
        line["tokenSha256"] = hashlib.sha256(token.encode()).hexdigest()
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return duplicate


@server.tool(description="Store value under key (a side effect the test counts).")
async def write_record(key: str, value: str, ctx: Context) -> str:
    record(ctx, "write_record", {"key": key, "value": value})
    return f"stored {key}={value}"


@server.tool(description="Delete the record under key. Destructive.")
async def delete_record(key: str, ctx: Context) -> str:
    record(ctx, "delete_record", {"key": key})
    return f"deleted {key}"


@server.tool(description="Store value under key, then take `seconds` to answer.")
async def slow_write(key: str, value: str, seconds: float, ctx: Context) -> str:
    duplicate = record(ctx, "slow_write", {"key": key, "value": value, "seconds": seconds})
    if not duplicate:
        await asyncio.sleep(max(0.0, min(seconds, 60.0)))
    return f"stored {key}={value}"


@server.tool(description="Every record written so far, as JSON lines.")
async def read_records() -> str:
    return "\n".join(json.dumps(e, sort_keys=True) for e in entries() if not e["duplicate"])


if __name__ == "__main__":
    server.run("stdio")
