import type { Emitter } from "../../src/emitter.js";

// Bounded waits: every wait in the tests fails with a message instead of hanging.

export async function within<T>(ms: number, what: string, promise: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Polls `check` until it is true, or fails after `ms`. */
export async function until(ms: number, what: string, check: () => boolean, every = 10): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, every));
  }
}

/** The next `name` event of `emitter`, bounded. */
export function nextEvent<E extends object, K extends keyof E>(emitter: Emitter<E>, name: K, ms: number): Promise<E[K]> {
  return within(ms, `event ${String(name)}`, new Promise<E[K]>((resolve) => emitter.once(name, resolve)));
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
