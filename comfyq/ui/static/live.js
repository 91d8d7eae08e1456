// One websocket subscribed to "*": every visible job's events, and preview images as binary frames.
// Reconnects by itself (backoff up to 5 s); "open" with reconnected=true tells views to catch up.

import { b64url, getKey } from "./api.js";

export class Live extends EventTarget {
  constructor() {
    super();
    this.ws = null;
    this.delay = 250;
    this.opened = false;
    this.up = false;
    this.stopped = true;
    this.timer = null;
  }

  start() {
    this.stopped = false;
    if (!this.ws && !this.timer) this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = null;
      ws.close();
    }
    this.setUp(false);
  }

  restart() {
    this.stop();
    this.start();
  }

  setUp(up) {
    if (this.up !== up) {
      this.up = up;
      this.dispatchEvent(new CustomEvent(up ? "up" : "down"));
    }
  }

  connect() {
    this.timer = null;
    if (this.stopped) return;
    const protocols = ["comfyq"];
    const key = getKey();
    if (key) protocols.push(`comfyq.bearer.${b64url(key)}`);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/ws`, protocols);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      ws.send(JSON.stringify({ subscribe: "*" }));
      const reconnected = this.opened;
      this.opened = true;
      this.delay = 250;
      this.setUp(true);
      this.dispatchEvent(new CustomEvent("open", { detail: { reconnected } }));
    };
    ws.onmessage = (m) => {
      if (typeof m.data === "string") {
        let ev;
        try {
          ev = JSON.parse(m.data);
        } catch {
          return;
        }
        if (ev && ev.request_id) this.dispatchEvent(new CustomEvent("event", { detail: ev }));
        return;
      }
      const view = new DataView(m.data);
      const n = view.getUint32(0);
      let head;
      try {
        head = JSON.parse(new TextDecoder().decode(new Uint8Array(m.data, 4, n)));
      } catch {
        return;
      }
      const blob = new Blob([new Uint8Array(m.data, 4 + n)], { type: head.mime || "image/jpeg" });
      this.dispatchEvent(new CustomEvent("preview", { detail: { ...head, blob } }));
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.setUp(false);
      if (this.stopped) return;
      this.timer = setTimeout(() => this.connect(), this.delay);
      this.delay = Math.min(this.delay * 2, 5000);
    };
  }
}
