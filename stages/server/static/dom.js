// Building the pages' elements: one tag, its class and its text in one call.

/** A new `tag` element with `className` (none if falsy) and `text` (none if undefined). */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
