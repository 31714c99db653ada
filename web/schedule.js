// Gate-schedule math and drawing for the Timestep Band node's live preview.
// Mirrors moe_core/band.py (TimestepBand, three_level_band) and moe_core/schedule.py (flow_sigmas,
// gates_vs_steps); tests/test_nodes.py runs these functions under Node.js and compares them with Python.
// No side effects at import: ComfyUI loads every .js file of the pack as an extension module.

export const DEFAULT_BAND = [[0.2, 0.5], [0.6, 1.0]];
export const ALWAYS_ON = [[0.0, 1.0]];
export const COLOURS = ["#e6553c", "#3c8ce6", "#46b45a", "#be78dc", "#f0b428", "#28bebe"];

/** Piecewise-constant band factor at noise level t: levels are [t_start, factor], 0 below the first. */
export function bandFactor(levels, t) {
  let out = 0.0;
  for (const [start, f] of levels) if (t >= start) out = f;
  return out;
}

/** The seeds' three-level band as levels; throws Error with the Python message on invalid input. */
export function threeLevelBand(start = 0.2, mid = 0.6, midFactor = 0.5, end = 1.0) {
  if (!(0 <= start && start <= mid && mid <= end && end <= 1)) {
    throw new Error(`need 0 <= start <= mid <= end <= 1, got start=${start}, mid=${mid}, end=${end}`);
  }
  const levels = [];
  if (mid > start) levels.push([start, midFactor]);
  if (end > mid) levels.push([mid, 1.0]);
  if (end < 1.0) levels.push([end, 0.0]);
  if (!levels.length) throw new Error("the band is empty: start, mid and end leave no range where experts act");
  return levels;
}

/** Levels for the node's preset widget; `fileDefault` is the file's band when known (else null). */
export function presetBand(preset, { start, mid, mid_factor, end }, fileDefault = null) {
  switch (preset) {
    case "three-level": return threeLevelBand(start, mid, mid_factor, end);
    case "seeds default": return DEFAULT_BAND;
    case "always on": return ALWAYS_ON;
    case "file default": return fileDefault ?? DEFAULT_BAND;
    default: throw new Error(`unknown preset ${preset}`);
  }
}

const f32 = Math.fround;

/** ComfyUI's "simple" scheduler on WAN's flow model with ModelSamplingSD3 `shift`: steps + 1 sigmas. */
export function flowSigmas(steps, shift, timesteps = 1000) {
  if (!(Number.isInteger(steps) && steps >= 1)) throw new Error(`steps must be a positive integer, got ${steps}`);
  if (!(shift > 0)) throw new Error(`shift must be > 0, got ${shift}`);
  const table = [];
  for (let i = 1; i <= timesteps; i++) {
    let t = f32(f32(f32(i / timesteps) * 1000) / 1000);
    if (shift !== 1.0) t = f32(f32(f32(shift) * t) / f32(1 + f32(f32(shift - 1) * t)));
    table.push(t);
  }
  const ss = timesteps / steps;
  const out = [];
  for (let x = 0; x < steps; x++) out.push(table[table.length - (1 + Math.floor(x * ss))]);
  out.push(0.0);
  return out;
}

/** Raw router gate of every expert at t, from a grid of gates over t = 0..1 (nearest point). */
export function rawAt(rawVsT, t) {
  if (!rawVsT || !rawVsT.length) return null;
  const i = Math.max(0, Math.min(rawVsT.length - 1, Math.round(t * (rawVsT.length - 1))));
  return rawVsT[i];
}

/** Per-step gates as GateController computes them: EMA over the steps (restarting at `restartAt`) × band. */
export function gatesVsSteps(levels, sigmas, rawVsT, emaBeta = 0.9, restartAt = []) {
  const run = sigmas.length > 1 && sigmas[sigmas.length - 1] === 0 ? sigmas.slice(0, -1) : sigmas;
  const restarts = new Set(restartAt);
  let ema = null;
  return run.map((sigma, i) => {
    const raw = rawAt(rawVsT, sigma) ?? [];
    ema = ema === null || restarts.has(i) ? raw.slice() : ema.map((e, k) => emaBeta * e + (1 - emaBeta) * raw[k]);
    const band = bandFactor(levels, sigma);
    return { step: i, sigma, band, gates: ema.map((g) => g * band) };
  });
}

/**
 * Draw the schedule on a 2D canvas context: band (dashed grey) and, when gates are known, each expert's
 * gate against t (left) and against the steps (right). `data` = {levels, steps, shift, experts, rawVsT,
 * emaBeta, boundary, error}.
 */
export function drawSchedule(ctx, width, height, data) {
  ctx.save();
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(0, 0, width, height);
  ctx.font = "10px sans-serif";
  if (data.error) {
    ctx.fillStyle = "#ff7070";
    ctx.fillText(data.error, 6, 16, width - 12);
    ctx.restore();
    return;
  }
  const top = 16, bottom = height - 24, gap = 14;
  const panelW = (width - 3 * gap) / 2;
  const panels = [[gap, gap + panelW], [2 * gap + panelW, 2 * gap + 2 * panelW]];
  const y = (v) => bottom - Math.max(0, Math.min(1, v)) * (bottom - top);
  const frame = ([x0, x1], label) => {
    ctx.strokeStyle = "#666";
    ctx.setLineDash([]);
    ctx.strokeRect(x0, top, x1 - x0, bottom - top);
    ctx.fillStyle = "#bbb";
    ctx.fillText(label, x0, top - 4);
  };
  const line = (pts, colour, dash = []) => {
    ctx.strokeStyle = colour;
    ctx.lineWidth = 1.5;
    ctx.setLineDash(dash);
    ctx.beginPath();
    pts.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
    ctx.stroke();
  };
  const experts = data.experts ?? [];
  // Left: against t (noise on the left).
  const [a0, a1] = panels[0];
  frame(panels[0], "gate vs noise level t: 1 → 0");
  const xt = (t) => a0 + (1 - t) * (a1 - a0);
  const ts = Array.from({ length: 201 }, (_, i) => i / 200);
  if (data.boundary != null) line([[xt(data.boundary), top], [xt(data.boundary), bottom]], "#777", [2, 3]);
  line(ts.map((t) => [xt(t), y(bandFactor(data.levels, t))]), "#aaa", [5, 4]);
  if (data.rawVsT) {
    experts.forEach((_, e) => line(ts.map((t) => [xt(t), y(rawAt(data.rawVsT, t)[e] * bandFactor(data.levels, t))]),
      COLOURS[e % COLOURS.length]));
  }
  // Right: against the steps.
  const [b0, b1] = panels[1];
  frame(panels[1], `per step: ${data.steps} steps, shift ${data.shift}`);
  const sched = gatesVsSteps(data.levels, flowSigmas(data.steps, data.shift), data.rawVsT, data.emaBeta ?? 0.9);
  const n = sched.length;
  const xs = (i) => b0 + (i / n) * (b1 - b0);
  if (data.boundary != null) {
    const firstLow = sched.findIndex((s) => s.sigma < data.boundary);
    const k = firstLow < 0 ? n : firstLow;
    line([[xs(k), top], [xs(k), bottom]], "#777", [2, 3]);
  }
  line(sched.flatMap((s) => [[xs(s.step), y(s.band)], [xs(s.step + 1), y(s.band)]]), "#aaa", [5, 4]);
  if (data.rawVsT) {
    experts.forEach((_, e) => line(sched.flatMap((s) => [[xs(s.step), y(s.gates[e])], [xs(s.step + 1), y(s.gates[e])]]),
      COLOURS[e % COLOURS.length]));
  }
  // Legend (short names: "Hook/Electrocautery" -> "Hook").
  ctx.setLineDash([]);
  let lx = gap;
  const entries = [["band", "#aaa"],
    ...(data.rawVsT ? experts.map((e, i) => [String(e).split("/")[0], COLOURS[i % COLOURS.length]]) : [])];
  for (const [label, colour] of entries) {
    ctx.fillStyle = colour;
    ctx.fillRect(lx, height - 14, 10, 3);
    ctx.fillStyle = "#ccc";
    ctx.fillText(label, lx + 13, height - 9);
    lx += 20 + ctx.measureText(label).width;
  }
  if (!data.rawVsT) {
    ctx.fillStyle = "#888";
    ctx.fillText("run the graph to see each expert's gate", lx + 6, height - 9, Math.max(40, width - lx - 10));
  }
  ctx.restore();
}
