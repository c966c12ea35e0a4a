// The live settings form: shows `config.current`, sends `config.update` and `preset.apply`.
//
// The settings belong to the one pipeline behind the server, not to this page: every
// browser session connected to the server sees the same values, and a change from any of
// them reaches all (the server pushes `config.current` to every session).

import { format } from "./stats_view.js";

export class SettingsForm {
  /**
   * @param {{form: HTMLFormElement, presets: HTMLElement, revision: HTMLElement}} ui
   * @param {(type: string, payload: object) => void} send
   */
  constructor(ui, send) {
    this.ui = ui;
    this.send = send;
    this.presetNames = "";
    ui.form.addEventListener("input", (e) => this.#showValue(e.target.name, e.target.value));
    ui.form.addEventListener("change", (e) => {
      const { name, value } = e.target;
      if (name) send("config.update", { [name]: name === "style" ? value : Number(value) });
    });
    ui.form.addEventListener("submit", (e) => e.preventDefault());
  }

  /** Show a `config.current` payload. */
  show(current) {
    const config = current.config ?? {};
    this.ui.revision.textContent = current.revision === undefined ? "" : `rev ${current.revision}`;
    const select = this.ui.form.elements.style;
    const styles = current.styles ?? (config.style ? [config.style] : []);
    if ([...select.options].map((o) => o.value).join("\n") !== styles.join("\n")) {
      select.replaceChildren(...styles.map((s) => new Option(s, s)));
    }
    for (const [name, value] of Object.entries(config)) {
      const input = this.ui.form.elements[name];
      if (!input) continue;
      if (document.activeElement !== input) input.value = value;  // never yank a slider mid-drag
      this.#showValue(name, input.value);
    }
    const presets = current.presets ?? [];
    const names = (Array.isArray(presets) ? presets : Object.keys(presets)).map(String);
    if (names.join("\n") !== this.presetNames) {
      this.presetNames = names.join("\n");
      this.ui.presets.replaceChildren(...names.map((name) => {
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = name;
        button.onclick = () => this.send("preset.apply", { name });
        return button;
      }));
    }
  }

  #showValue(name, value) {
    const output = this.ui.form.querySelector(`output[data-for="${name}"]`);
    if (output) output.textContent = format(Number(value));
  }
}
