/* The two charts (latency per token, bytes on the wire), drawn on plain canvases.
 *
 * No charting library: two line charts with a legend need little code, and the page must work
 * with no build step and no internet.
 */

/** A round tick step (1, 2 or 5 times a power of ten) giving about `ticks` ticks over `span`. */
export function niceStep(span, ticks) {
  const raw = span / Math.max(ticks, 1);
  const power = 10 ** Math.floor(Math.log10(raw || 1));
  const scaled = raw / power;
  return (scaled <= 1 ? 1 : scaled <= 2 ? 2 : scaled <= 5 ? 5 : 10) * power;
}

/**
 * The ranges and tick steps that fit every point of `series`: x from 0, y from 0 or below
 * (latency can be slightly negative), both rounded out to whole steps.
 */
export function axes(series) {
  let xMax = 1;
  let yMin = 0;
  let yMax = 0;
  for (const s of series) {
    for (const [x, y] of s.points) {
      if (x > xMax) xMax = x;
      if (y > yMax) yMax = y;
      if (y < yMin) yMin = y;
    }
  }
  const yStep = niceStep(yMax - yMin || 1, 4);
  yMax = Math.max(yStep, Math.ceil(yMax / yStep) * yStep);
  yMin = Math.floor(yMin / yStep) * yStep;
  const xStep = niceStep(xMax, 6);
  xMax = Math.ceil(xMax / xStep) * xStep;
  return { xMax, xStep, yMin, yMax, yStep };
}

/** One chart on a <canvas>; `format(value)` writes the y-axis labels. */
export class Chart {
  constructor(canvas, format) {
    this.canvas = canvas;
    this.format = format;
  }

  /**
   * Draw `series` ([{label, color, points: [[x, y], ...]}]) to fit the canvas as laid out now;
   * `dots` marks each point (for scattered samples rather than a running total).
   */
  draw(series, { dots = false } = {}) {
    const canvas = this.canvas;
    const ratio = globalThis.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    if (
      canvas.width !== Math.round(width * ratio) ||
      canvas.height !== Math.round(height * ratio)
    ) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "11px system-ui, sans-serif";
    const left = 52;
    const right = 8;
    const top = 20;
    const bottom = 18;
    const plotW = width - left - right;
    const plotH = height - top - bottom;

    const { xMax, xStep, yMin, yMax, yStep } = axes(series);
    const px = (x) => left + (x / xMax) * plotW;
    const py = (y) => top + plotH - ((y - yMin) / (yMax - yMin)) * plotH;

    ctx.strokeStyle = "#e3e7ec";
    ctx.fillStyle = "#5f6b7a";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let y = yMin; y <= yMax + yStep / 2; y += yStep) {
      ctx.beginPath();
      ctx.moveTo(left, Math.round(py(y)) + 0.5);
      ctx.lineTo(left + plotW, Math.round(py(y)) + 0.5);
      ctx.stroke();
      ctx.fillText(this.format(y), left - 6, py(y));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let x = 0; x <= xMax + xStep / 2; x += xStep) {
      ctx.fillText(`${+x.toFixed(2)}s`, px(x), top + plotH + 4);
    }

    let legendX = left;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    for (const s of series) {
      ctx.fillStyle = s.color;
      ctx.fillRect(legendX, 6, 10, 10);
      ctx.fillStyle = "#1d232b";
      ctx.fillText(s.label, legendX + 14, 11);
      legendX += ctx.measureText(s.label).width + 30;
    }

    let any = false;
    for (const s of series) {
      if (!s.points.length) continue;
      any = true;
      ctx.strokeStyle = s.color;
      ctx.fillStyle = s.color;
      ctx.lineWidth = 1.5;
      ctx.globalAlpha = dots ? 0.45 : 1;
      ctx.beginPath();
      s.points.forEach(([x, y], i) => (i ? ctx.lineTo(px(x), py(y)) : ctx.moveTo(px(x), py(y))));
      ctx.stroke();
      if (dots) {
        ctx.globalAlpha = 0.9;
        for (const [x, y] of s.points) ctx.fillRect(px(x) - 1.5, py(y) - 1.5, 3, 3);
      }
      ctx.globalAlpha = 1;
    }
    if (!any) {
      ctx.fillStyle = "#8a94a3";
      ctx.textAlign = "center";
      ctx.fillText("no data yet", left + plotW / 2, top + plotH / 2);
    }
  }
}
