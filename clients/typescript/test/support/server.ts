// Starts the real routopia-realtime binary (and redis-server) for integration tests, and signs
// HS256 tokens the way an app's auth backend would.
import { spawn, type ChildProcess } from "node:child_process";
import { createHmac } from "node:crypto";
import { createServer, connect } from "node:net";
import { fileURLToPath } from "node:url";
import { within } from "./wait.js";

/**
 * The binary under test: $REALTIME_SERVER_BIN, or the workspace's debug build. (Not a
 * `ROUTOPIA_*` name: the server reads those as its settings.)
 */
export const BIN = process.env.REALTIME_SERVER_BIN ?? fileURLToPath(new URL("../../../../../target/debug/routopia-realtime", import.meta.url));

export const SECRET = "routopia-ts-test-secret-0123456789abcdef";

export function sign(claims: Record<string, unknown>): string {
  const encode = (value: unknown) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const unsigned = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  return `${unsigned}.${createHmac("sha256", SECRET).update(unsigned).digest("base64url")}`;
}

/** A token for `user`, allowed every channel, valid `seconds`. */
export function token(user: string, seconds = 3600): string {
  return sign({ sub: user, exp: Math.floor(Date.now() / 1000) + seconds, subscribe: ["*"], publish: ["*"] });
}

export interface ServerOptions {
  /** Default 127.0.0.1:0; the address of a stopped server to restart it there. */
  listen?: string;
  /** `ROUTOPIA_*` settings; rate limits are off unless set here. */
  env?: Record<string, string>;
  broker?: string;
}

export class RealtimeServer {
  private constructor(
    private readonly child: ChildProcess,
    readonly addr: string,
    readonly log: () => string,
  ) {}

  get url(): string {
    return `ws://${this.addr}/ws`;
  }

  static async start(options: ServerOptions = {}): Promise<RealtimeServer> {
    const args = ["serve", "--listen", options.listen ?? "127.0.0.1:0", "--shards", "2"];
    if (options.broker) args.push("--broker", options.broker);
    const child = spawn(BIN, args, {
      env: {
        // The test's own settings only, not whatever ROUTOPIA_* the calling shell has.
        ...Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith("ROUTOPIA_"))),
        RUST_LOG: "warn",
        ROUTOPIA_AUTH__HMAC_SECRET: SECRET,
        ROUTOPIA_RATE_LIMITS__ENABLED: "false",
        ROUTOPIA_RATE_LIMITS__CONNECTION_ATTEMPTS_PER_IP__REQUESTS: "0",
        ...options.env,
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stderr = "";
    child.stderr!.on("data", (chunk) => (stderr += chunk));
    const addr = await within(20_000, `${BIN} printing its address`, new Promise<string>((resolve, reject) => {
      let stdout = "";
      child.stdout!.on("data", (chunk) => {
        stdout += chunk;
        const match = /^listening on (\S+)$/m.exec(stdout);
        if (match) resolve(match[1]!);
      });
      child.once("error", reject);
      child.once("exit", (code) => reject(new Error(`server exited (${code}) before listening:\n${stderr}`)));
    }));
    return new RealtimeServer(child, addr, () => stderr);
  }

  /** Kills the process with `signal` and waits for it to be gone. */
  async stop(signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.kill(signal);
    await within(20_000, "server exit", exited);
  }
}

export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as { port: number }).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** A `redis-server` without persistence on a free loopback port. */
export class RedisServer {
  private constructor(
    private readonly child: ChildProcess,
    readonly port: number,
  ) {}

  get url(): string {
    return `redis://127.0.0.1:${this.port}/0`;
  }

  static async start(): Promise<RedisServer> {
    const port = await freePort();
    const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
    const redis = new RedisServer(child, port);
    const deadline = Date.now() + 10_000;
    while (!(await redis.ping())) {
      if (Date.now() > deadline) throw new Error("redis-server did not answer PING within 10 s");
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return redis;
  }

  private ping(): Promise<boolean> {
    return new Promise((resolve) => {
      const socket = connect(this.port, "127.0.0.1");
      socket.setTimeout(1000);
      socket.once("connect", () => socket.write("PING\r\n"));
      socket.once("data", (data) => {
        socket.destroy();
        resolve(data.toString().startsWith("+PONG"));
      });
      socket.once("error", () => resolve(false));
      socket.once("timeout", () => {
        socket.destroy();
        resolve(false);
      });
    });
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.kill("SIGKILL");
    await within(10_000, "redis exit", exited);
  }
}
