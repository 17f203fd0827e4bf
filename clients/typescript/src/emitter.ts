/** A small typed event emitter that works the same in browsers and Node. */
export class Emitter<Events extends object> {
  private listeners = new Map<keyof Events, Set<(event: never) => void>>();

  /** Calls `listener` for every `name` event; returns a function that removes it. */
  on<K extends keyof Events>(name: K, listener: (event: Events[K]) => void): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(listener as (event: never) => void);
    return () => this.off(name, listener);
  }

  once<K extends keyof Events>(name: K, listener: (event: Events[K]) => void): () => void {
    const off = this.on(name, (event) => {
      off();
      listener(event);
    });
    return off;
  }

  off<K extends keyof Events>(name: K, listener: (event: Events[K]) => void): void {
    this.listeners.get(name)?.delete(listener as (event: never) => void);
  }

  listenerCount<K extends keyof Events>(name: K): number {
    return this.listeners.get(name)?.size ?? 0;
  }

  protected emit<K extends keyof Events>(name: K, event: Events[K]): void {
    for (const listener of [...(this.listeners.get(name) ?? [])]) {
      try {
        (listener as (event: Events[K]) => void)(event);
      } catch (err) {
        // A throwing listener must not break delivery to the others or the client's state.
        this.listenerFailed(err);
      }
    }
  }

  protected listenerFailed(err: unknown): void {
    console.error("routopia realtime: an event listener threw", err);
  }
}
