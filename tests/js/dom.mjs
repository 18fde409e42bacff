// A stand-in for the few DOM pieces a pane touches (its <article> and a text node), for node.

export class FakeText {
  constructor(data) {
    this.data = data;
  }
  get length() {
    return this.data.length;
  }
  appendData(text) {
    this.data += text;
  }
  deleteData(offset, count) {
    this.data = this.data.slice(0, offset) + this.data.slice(offset + count);
  }
}

globalThis.document = { createTextNode: (text) => new FakeText(text) };

function element(dataset = {}) {
  return {
    dataset,
    textContent: "",
    title: "",
    disabled: true,
    scrollTop: 0,
    scrollHeight: 99,
    listeners: {},
    bad: false,
    classList: {},
    replaceChildren(...children) {
      this.children = children;
    },
    addEventListener(type, handler) {
      this.listeners[type] = handler;
    },
  };
}

/** A pane's <article>: its parts (state, answer, note, cut) and a few metrics. */
export function fakeRoot(transport = "test", label = "Test") {
  const parts = {
    state: element(),
    answer: element(),
    note: element(),
    cut: element(),
  };
  const metrics = ["tokens", "integrity", "reconnects"].map((name) => {
    const dd = element({ metric: name });
    dd.classList.toggle = (_, on) => (dd.bad = on);
    return dd;
  });
  return {
    dataset: { transport, label, color: "#123456" },
    parts,
    metrics,
    querySelector: (selector) => parts[/data-role=(\w+)/.exec(selector)[1]],
    querySelectorAll: () => metrics,
  };
}
