// The "Messages" list of a page: newest first, a repeat counted instead of repeated.

export class Notes {
  /** @param {HTMLUListElement} list @param {number} max entries kept */
  constructor(list, max = 12) {
    this.list = list;
    this.max = max;
  }

  /** Add a line; `level` "error" or "info" styles it. */
  add(level, text) {
    const first = this.list.firstElementChild;
    if (first && first.dataset.text === text) {  // repeated: count instead of flooding
      first.dataset.count = String(Number(first.dataset.count) + 1);
      first.lastChild.textContent = ` ×${first.dataset.count}`;
      return;
    }
    const item = document.createElement("li");
    item.className = level;
    item.dataset.text = text;
    item.dataset.count = "1";
    const time = document.createElement("time");
    time.textContent = new Date().toLocaleTimeString();
    item.append(time, ` ${text}`, document.createElement("span"));
    this.list.prepend(item);
    while (this.list.children.length > this.max) this.list.lastElementChild.remove();
  }
}
