// A pipeline's DAG drawn as SVG from the Mermaid text the API gives (`GET /api/pipelines/{name}`): the
// `flowchart` subset that `echo-worker graph` writes (nodes `id["label"]`, edges `a --> b`), laid out in layers
// by longest path from the sources, ordered within a layer by the mean position of the nodes before it.

const SVG = 'http://www.w3.org/2000/svg';

/** `{ direction, nodes: [{ id, lines }], edges: [[from, to]] }` from Mermaid flowchart text. */
export function parseMermaid(text) {
  const nodes = new Map();
  const edges = [];
  let direction = 'LR';
  const node = (id, label) => {
    if (!nodes.has(id)) nodes.set(id, { id, lines: [id] });
    if (label !== undefined) {
      const decoded = label.replace(/#quot;/g, '"').replace(/#amp;/g, '&');
      nodes.get(id).lines = decoded.split(/<br\s*\/?>/i).map((part) => part.replace(/<[^>]*>/g, '').trim())
        .filter(Boolean);
    }
  };
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('%%')) continue;
    const head = line.match(/^(?:flowchart|graph)\s+(TB|TD|BT|RL|LR)\b/);
    if (head) { direction = head[1]; continue; }
    const edge = line.match(/^([\w-]+)(?:\[.*?\])?\s*-{2,}>\s*(?:\|[^|]*\|\s*)?([\w-]+)/);
    if (edge) { node(edge[1]); node(edge[2]); edges.push([edge[1], edge[2]]); continue; }
    const declared = line.match(/^([\w-]+)\s*[[(]+"?(.*?)"?[\])]+\s*$/);
    if (declared) node(declared[1], declared[2]);
  }
  return { direction, nodes: [...nodes.values()], edges };
}

/** Layers (longest path from a source) and an order within each layer (two barycentre sweeps). */
export function layout(graph) {
  const preds = new Map(graph.nodes.map((n) => [n.id, []]));
  for (const [from, to] of graph.edges) preds.get(to).push(from);
  const layer = new Map();
  const depth = (id, seen = new Set()) => {
    if (layer.has(id)) return layer.get(id);
    if (seen.has(id)) return 0; // a cycle (the API never sends one): stop rather than loop
    seen.add(id);
    const value = Math.max(-1, ...preds.get(id).map((p) => depth(p, seen))) + 1;
    layer.set(id, value);
    return value;
  };
  graph.nodes.forEach((n) => depth(n.id));
  const layers = [];
  for (const n of graph.nodes) (layers[layer.get(n.id)] ||= []).push(n.id);
  const position = new Map();
  const place = () => layers.forEach((ids) => ids.forEach((id, i) => position.set(id, i)));
  place();
  for (let sweep = 0; sweep < 2; sweep += 1) {
    for (const ids of layers.slice(1)) {
      const mean = (id) => {
        const ps = preds.get(id);
        return ps.length ? ps.reduce((sum, p) => sum + position.get(p), 0) / ps.length : position.get(id);
      };
      ids.sort((a, b) => mean(a) - mean(b));
    }
    place();
  }
  return { layers, layer, position };
}

function el(name, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children) node.append(child);
  return node;
}

/** The SVG of a Mermaid flowchart; `title` names it for screen readers. */
export function drawMermaid(text, title) {
  const graph = parseMermaid(text);
  const { layers, layer, position } = layout(graph);
  const W = 150, H = 46, GX = 60, GY = 22, PAD = 12;
  const vertical = graph.direction === 'TB' || graph.direction === 'TD' || graph.direction === 'BT';
  const widest = Math.max(1, ...layers.map((ids) => ids.length));
  const at = (id) => {
    const ids = layers[layer.get(id)];
    const offset = (widest - ids.length) / 2 + position.get(id);
    const main = PAD + layer.get(id) * ((vertical ? H : W) + (vertical ? GY * 2 : GX));
    const cross = PAD + offset * ((vertical ? W : H) + (vertical ? GX / 2 : GY));
    return vertical ? { x: cross, y: main } : { x: main, y: cross };
  };
  const width = vertical ? PAD * 2 + widest * (W + GX / 2) : PAD * 2 + layers.length * (W + GX) - GX;
  const height = vertical ? PAD * 2 + layers.length * (H + GY * 2) - GY * 2 : PAD * 2 + widest * (H + GY) - GY;
  const svg = el('svg', { viewBox: `0 0 ${width} ${height}`, width, height, role: 'img', 'aria-label': title });
  svg.append(el('title', {}, title));
  const marker = el('marker', { id: `arrow-${title.replace(/\W/g, '_')}`, viewBox: '0 0 10 10', refX: 9, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' }, el('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrow' }));
  svg.append(el('defs', {}, marker));
  for (const [from, to] of graph.edges) {
    const a = at(from), b = at(to);
    const d = vertical
      ? `M${a.x + W / 2},${a.y + H} C${a.x + W / 2},${a.y + H + GY} ${b.x + W / 2},${b.y - GY} ${b.x + W / 2},${b.y}`
      : `M${a.x + W},${a.y + H / 2} C${a.x + W + GX / 2},${a.y + H / 2} ${b.x - GX / 2},${b.y + H / 2} ${b.x},${b.y + H / 2}`;
    svg.append(el('path', { d, class: 'edge', 'marker-end': `url(#${marker.id})`, 'data-from': from, 'data-to': to }));
  }
  for (const n of graph.nodes) {
    const p = at(n.id);
    const group = el('g', { class: 'node', 'data-stage': n.lines[0] });
    group.append(el('title', {}, n.lines.join(' — ')));
    group.append(el('rect', { x: p.x, y: p.y, width: W, height: H, rx: 6 }));
    const [name, ...rest] = n.lines;
    group.append(el('text', { x: p.x + W / 2, y: p.y + (rest.length ? 19 : 28), 'text-anchor': 'middle' }, clip(name)));
    if (rest.length) {
      group.append(el('text', { x: p.x + W / 2, y: p.y + 36, 'text-anchor': 'middle', class: 'kind' }, clip(rest.join(' '))));
    }
    svg.append(group);
  }
  return svg;
}

function clip(text) {
  return text.length > 22 ? `${text.slice(0, 21)}…` : text;
}
