/* How the dashboard writes its figures: milliseconds, bytes, plain numbers, percentiles.
 *
 * Pure functions, no DOM: the panes, the summary table, the charts and the findings all use
 * them, and tests/js runs them under node.
 */

/** Between the parts of a figure like "12 / 30 / 41": thin spaces keep a narrow pane readable. */
export const SLASH = "\u2009/\u2009";

/** "–" for no value, one decimal under 10 ms, whole milliseconds above. */
export function fmtMs(value) {
  if (value === null || value === undefined) return "–";
  return Math.abs(value) < 10 ? value.toFixed(1) : String(Math.round(value));
}

/** "–" for no value, then B, kB or MB. */
export function fmtBytes(value) {
  if (value === null || value === undefined) return "–";
  if (value < 10000) return `${Math.round(value)} B`;
  if (value < 10e6) return `${(value / 1024).toFixed(1)} kB`;
  return `${(value / 1048576).toFixed(1)} MB`;
}

/** "–" for no value, else `digits` decimals. */
export function fmtNum(value, digits = 0) {
  return value === null || value === undefined ? "–" : value.toFixed(digits);
}

/** The nearest-rank percentile `p` (0-100) of an ascending array; null when it is empty. */
export function percentile(sorted, p) {
  if (!sorted.length) return null;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank];
}

/** Text made safe to put inside HTML. */
export function escapeHtml(text) {
  return String(text).replace(
    /[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c],
  );
}
