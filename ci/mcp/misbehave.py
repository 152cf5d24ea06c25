"""A misbehaving MCP server, for the client's bad-input tests (operator/tests/mcp_bad_servers.rs).

Written with the Python MCP SDK (mcp 2.3.0, `ci/peers.sh mcp-python`) so that everything except the
misbehaviour itself is a real server's protocol. Usage:

    misbehave.py [--http PORT] MODE

MODE:
  tools       the tools below, otherwise well behaved:
                echo(message)   answers "echo: <message>" (proves the server still works)
                crash()         the server process exits at once (exit status 3), mid-call
                hang()          never answers
                huge(megabytes) answers with that many MB of text (default 10)
                env(name)       answers the value of an environment variable
  many-tools  lists 10,000 tools (each an echo)
  garbage     (stdio only) initialises like a server, then answers tools/list and tools/call with a
              line that is not JSON-RPC; the line carries $API_TOKEN when set, so a client that
              copies server output into its errors would leak the secret. The SDK never writes
              garbage on purpose, so this mode answers with raw writes.

With --http PORT the server speaks streamable HTTP on 127.0.0.1:PORT at /mcp; otherwise stdio.
"""

import asyncio
import json
import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.tools import Tool

MANY_TOOLS = 10_000


def serve_tools(server: MCPServer) -> None:
    @server.tool(description="Echoes the message back.")
    def echo(message: str) -> str:
        return f"echo: {message}"

    @server.tool(description="Ends the server process in the middle of the call.")
    def crash() -> str:
        sys.stdout.flush()
        os._exit(3)

    @server.tool(description="Never answers.")
    async def hang() -> str:
        await asyncio.Event().wait()
        return "unreachable"

    @server.tool(description="Answers with `megabytes` MB of text.")
    def huge(megabytes: int = 10) -> str:
        return "x" * (megabytes * 1024 * 1024)

    @server.tool(description="Answers the value of an environment variable.")
    def env(name: str) -> str:
        return os.environ.get(name, "")


def many_tools() -> list[Tool]:
    def echo(message: str) -> str:
        return f"echo: {message}"

    # One tool built from the function, copied under 10,000 names: building each from the function
    # costs the SDK ~1.5 ms, which would make the server take 15 s to start.
    one = Tool.from_function(echo, name="echo-0", description="Echoes the message back.")
    return [one.model_copy(update={"name": f"echo-{i}"}) for i in range(MANY_TOOLS)]


def garbage() -> None:
    """A raw stdio JSON-RPC loop: a correct initialize answer, then garbage for every request."""
    secret = os.environ.get("API_TOKEN", "")
    out = sys.stdout
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "id" not in msg:
            continue  # notifications (initialized) need no answer
        if msg.get("method") == "initialize":
            answer = {
                "jsonrpc": "2.0",
                "id": msg["id"],
                "result": {
                    "protocolVersion": msg["params"]["protocolVersion"],
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "misbehave-garbage", "version": "0"},
                },
            }
            out.write(json.dumps(answer) + "\n")
        else:
            # Truncated JSON with trailing junk: not a JSON-RPC message by any reading.
            out.write('{"jsonrpc": "2.0", "id": %s, "result": {"token": "%s" <<garbage>>\n'
                      % (json.dumps(msg["id"]), secret))
        out.flush()


def main(argv: list[str]) -> int:
    port = None
    if len(argv) >= 2 and argv[0] == "--http":
        port = int(argv[1])
        argv = argv[2:]
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    mode = argv[0]
    if mode == "garbage":
        if port is not None:
            print("garbage mode is stdio only", file=sys.stderr)
            return 2
        garbage()
        return 0
    if mode == "tools":
        server = MCPServer("misbehave", log_level="ERROR")
        serve_tools(server)
    elif mode == "many-tools":
        server = MCPServer("misbehave", log_level="ERROR", tools=many_tools())
    else:
        print(f"unknown mode {mode!r}\n{__doc__}", file=sys.stderr)
        return 2
    if port is None:
        server.run()
    else:
        server.run("streamable-http", host="127.0.0.1", port=port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
