/* The circuit explorer (feature_circuits.render): draws the circuit in #fc-data with cytoscape.js.
   Every piece of data text goes into the page with textContent, never as HTML. */
(function () {
  'use strict';
  var T0 = window.performance ? performance.now() : 0;
  var D = JSON.parse(document.getElementById('fc-data').textContent);
  var CMP = D.compare;
  var POS = '#2166ac', NEG = '#b2182b';
  var GROUP_COLORS = ['#e6a100', '#2ca02c', '#9467bd', '#17becf', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22'];
  var state = { nodeStep: 0, edgeStep: D.initial_edge_step || 0, trace: false, traceK: 2, show: 'all', collapsed: {}, panel: null };

  // ---------------------------------------------------------------------------- small helpers
  function el(tag, attrs, text) {
    var x = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (k === 'class') { x.className = attrs[k]; } else { x.setAttribute(k, attrs[k]); }
      });
    }
    if (text !== undefined && text !== null) { x.textContent = String(text); }
    return x;
  }
  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) { return '\u2013'; }
    var s = Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : v.toPrecision(3);
    return (v >= 0 ? '+' : '') + s;
  }
  function short(s, n) { return s.length > n ? s.slice(0, n - 1) + '\u2026' : s; }
  function showTok(t) { return t.replace(/\n/g, '\u23ce').replace(/\t/g, '\u21e5'); }

  // ------------------------------------------------------------------------------------ data
  var byId = {};
  D.nodes.forEach(function (n) { byId[n.id] = n; });
  var edges = D.edges.map(function (e, i) {
    return { id: 'e' + i, s: e[0], t: e[1], w: e[2], inn: e[3] || null, wB: e.length > 4 ? e[4] : null };
  });
  var labels = {};  // "site\u0000feature" -> [site, feature, label]
  function lkey(site, f) { return site + '\u0000' + (f === null ? 'err' : f); }
  D.labels.forEach(function (l) { labels[lkey(l[0], l[1])] = l; });
  function labelOf(n) { var l = labels[lkey(n.site, n.f)]; return l ? l[2] : ''; }
  var groups = D.groups.map(function (g, i) { return { name: g.name, nodes: g.nodes.slice(), color: GROUP_COLORS[i % GROUP_COLORS.length] }; });
  var effMax = 0, wMax = 0;
  D.nodes.forEach(function (n) { effMax = Math.max(effMax, Math.abs(n.eff)); });
  edges.forEach(function (e) { if (e.t !== 'logit') { wMax = Math.max(wMax, Math.abs(e.w)); } });
  var wLogitMax = 0;
  edges.forEach(function (e) { if (e.t === 'logit') { wLogitMax = Math.max(wLogitMax, Math.abs(e.w)); } });
  effMax = effMax || 1; wMax = wMax || 1; wLogitMax = wLogitMax || 1;

  // ------------------------------------------------------------------------------------ page
  var app = document.getElementById('fc-app');
  var head = el('div', { id: 'fc-head' });
  head.appendChild(el('h1', { id: 'fc-title' }, D.title));
  var meta = el('details', { id: 'fc-meta' });
  meta.appendChild(el('summary', null, 'run details'));
  var mt = el('table');
  D.meta.forEach(function (kv) {
    var tr = el('tr'); tr.appendChild(el('td', null, kv[0])); tr.appendChild(el('td', null, kv[1])); mt.appendChild(tr);
  });
  meta.appendChild(mt);
  head.appendChild(meta);
  var emptyNote = document.getElementById('fc-empty');  // written into the page by Python (readable without script)
  if (emptyNote) { head.appendChild(emptyNote); }
  app.appendChild(head);

  var bar = el('div', { id: 'fc-toolbar' });
  function slider(id, text, n) {
    var lab = el('label', { 'for': id }, text);
    var inp = el('input', { id: id, type: 'range', min: '0', max: String(Math.max(n - 1, 0)), step: '1', value: '0' });
    var val = el('span', { id: id + '-value', 'class': 'fc-val' });
    lab.appendChild(inp); lab.appendChild(val); bar.appendChild(lab);
    return [inp, val];
  }
  var ns = slider('fc-node-slider', 'nodes |effect| >', D.node_thresholds.length);
  var es = slider('fc-edge-slider', 'edges |weight| >', D.edge_thresholds.length);
  es[0].value = String(state.edgeStep);
  var sbox = el('div', { id: 'fc-searchbox' });
  var search = el('input', { id: 'fc-search', type: 'search', placeholder: 'search labels, ids, sites', autocomplete: 'off' });
  var results = el('div', { id: 'fc-search-results' });
  sbox.appendChild(search); sbox.appendChild(results); bar.appendChild(sbox);
  var traceBtn = el('button', { id: 'fc-trace', type: 'button', title: 'show only the nodes on the strongest paths into the logit' }, 'trace from the answer');
  bar.appendChild(traceBtn);
  var kLab = el('label', { 'for': 'fc-trace-k' }, 'inputs per node');
  var kIn = el('input', { id: 'fc-trace-k', type: 'number', min: '1', max: '20', value: String(state.traceK), style: 'width:3.5em' });
  kLab.appendChild(kIn); bar.appendChild(kLab);
  var fitBtn = el('button', { id: 'fc-fit', type: 'button' }, 'fit');
  bar.appendChild(fitBtn);
  var showSel = null;
  if (CMP) {
    var sl = el('label', { 'for': 'fc-show' }, 'show');
    showSel = el('select', { id: 'fc-show' });
    [['all', 'all'], ['both', 'in both'], ['a', 'only in A (' + CMP.names[0] + ')'], ['b', 'only in B (' + CMP.names[1] + ')']].forEach(function (o) {
      showSel.appendChild(el('option', { value: o[0] }, o[1]));
    });
    sl.appendChild(showSel); bar.appendChild(sl);
  }
  var legend = el('div', { id: 'fc-legend' });
  function leg(color, text) { var s = el('span'); s.appendChild(el('span', { 'class': 'fc-swatch', style: 'background:' + color })); s.appendChild(document.createTextNode(text)); legend.appendChild(s); }
  leg(POS, 'positive'); leg(NEG, 'negative'); leg('#fff;border:2px solid #333', 'square: error node');
  if (CMP) { leg('#fff;border:2px dashed #e6550d', 'only in A'); leg('#fff;border:2px dashed #31a354', 'only in B'); }
  bar.appendChild(legend);
  app.appendChild(bar);

  var main = el('div', { id: 'fc-main' });
  var cyDiv = el('div', { id: 'fc-cy' });
  var panel = el('aside', { id: 'fc-panel' });
  main.appendChild(cyDiv); main.appendChild(panel); app.appendChild(main);
  var nodeBox = el('div', { id: 'fc-node' });
  nodeBox.appendChild(el('p', { 'class': 'fc-hint' }, 'Click a node to see what it is, where it fires and its strongest edges. Hover highlights its neighbours; shift-click or shift-drag selects several nodes to group.'));
  panel.appendChild(nodeBox);
  var groupBox = el('div', { id: 'fc-groups' });
  panel.appendChild(groupBox);

  // -------------------------------------------------------------------------------- cytoscape
  (function widen() {  // spread the rows out to the width of the view (the layout is tall)
    var xs0 = D.nodes.map(function (n) { return n.x; }), ys0 = D.nodes.map(function (n) { return n.y; }).concat([D.logit.y]);
    if (!xs0.length) { return; }
    var w = Math.max.apply(null, xs0) - Math.min.apply(null, xs0), h = Math.max.apply(null, ys0) - Math.min.apply(null, ys0);
    var aspect = (cyDiv.clientWidth || 1000) / (cyDiv.clientHeight || 700);
    if (w <= 0 || h <= 0 || w / h >= aspect) { return; }
    var s = Math.min(aspect * h / w * 0.92, 2.2);
    if (s <= 1) { return; }
    D.nodes.forEach(function (n) { n.x *= s; });
    D.logit.x *= s;
    D.columns.forEach(function (c) { c[1] *= s; });
  })();
  var elements = [], superPos = {};
  var xs = D.nodes.map(function (n) { return n.x; }).concat([D.logit.x]);
  var minX = Math.min.apply(null, xs), maxY = Math.max.apply(null, D.nodes.map(function (n) { return n.y; }).concat([D.logit.y]));
  D.rows.forEach(function (r) {
    elements.push({ group: 'nodes', data: { id: 'row:' + r[0], label: r[0] }, position: { x: minX - 50, y: r[1] }, classes: 'rowlabel', selectable: false, grabbable: false });
  });
  D.columns.forEach(function (c, i) {
    elements.push({ group: 'nodes', data: { id: 'col:' + i, label: showTok(c[0]) }, position: { x: c[1], y: maxY + 45 }, classes: 'collabel', selectable: false, grabbable: false });
  });
  function nodeLabel(n) { var l = labelOf(n); return l ? short(l, 24) : (n.err ? 'err' : '#' + n.f); }
  D.nodes.forEach(function (n) {
    var cls = 'fc ' + (n.err ? 'err' : 'feat');
    if (n['in'] === 'a') { cls += ' only-a'; } else if (n['in'] === 'b') { cls += ' only-b'; }
    elements.push({ group: 'nodes', data: { id: n.id, label: nodeLabel(n), size: 12 + 26 * Math.sqrt(Math.min(Math.abs(n.eff) / effMax, 1)), color: n.eff >= 0 ? POS : NEG }, position: { x: n.x, y: n.y }, classes: cls });
  });
  elements.push({ group: 'nodes', data: { id: 'logit', label: 'logit' + (D.total_effect === null ? '' : ' (' + fmt(D.total_effect) + ')') }, position: { x: D.logit.x, y: D.logit.y }, classes: 'logit' });
  edges.forEach(function (e) {
    var r = Math.sqrt(Math.min(Math.abs(e.w) / (e.t === 'logit' ? wLogitMax : wMax), 1));
    var cls = 'fc';
    if (e.inn === 'a') { cls += ' only-a'; } else if (e.inn === 'b') { cls += ' only-b'; }
    var cv = curve(e.s, e.t);
    elements.push({ group: 'edges', data: { id: e.id, source: e.s, target: e.t, cpd: cv.d, cpw: cv.w, width: 0.4 + 5 * r, op: 0.1 + 0.8 * r, color: e.w >= 0 ? POS : NEG }, classes: cls });
  });

  function xy(id) { return id === 'logit' ? D.logit : (byId[id] || (superPos[id])); }
  function curve(a, b) {  // S-curve: vertical tangents at both ends (two quadratic pieces)
    var s = xy(a), t = xy(b);
    var dx = t.x - s.x, dy = t.y - s.y, L2 = dx * dx + dy * dy;
    if (Math.abs(dx) < 1 || L2 < 1) { return { d: [0, 0], w: [0.3, 0.7] }; }
    var L = Math.sqrt(L2), w1 = (dy * dy) / (2 * L2), d = (dx * dy) / (2 * L);
    return { d: [-d, d], w: [w1, 1 - w1] };
  }
  var style = [
    { selector: 'node', style: { 'label': 'data(label)', 'font-size': 9, 'color': '#333', 'text-valign': 'bottom', 'text-margin-y': 2, 'min-zoomed-font-size': 5, 'text-wrap': 'ellipsis', 'text-max-width': '90px' } },
    { selector: 'node.fc', style: { 'width': 'data(size)', 'height': 'data(size)', 'background-color': 'data(color)', 'border-width': 1, 'border-color': '#fff' } },
    { selector: 'node.err', style: { 'shape': 'round-rectangle', 'border-width': 2, 'border-color': '#333' } },
    { selector: 'node.logit', style: { 'shape': 'diamond', 'width': 26, 'height': 26, 'background-color': '#777', 'font-size': 12, 'text-valign': 'top', 'text-margin-y': -3 } },
    { selector: 'node.rowlabel', style: { 'width': 1, 'height': 1, 'background-opacity': 0, 'text-valign': 'center', 'text-halign': 'left', 'font-size': 13, 'color': '#555', 'events': 'no' } },
    { selector: 'node.collabel', style: { 'width': 1, 'height': 1, 'background-opacity': 0, 'text-valign': 'center', 'font-size': 12, 'color': '#555', 'events': 'no' } },
    { selector: 'node.grouped', style: { 'border-width': 3, 'border-color': 'data(gcolor)' } },
    { selector: 'node.only-a', style: { 'border-width': 4, 'border-style': 'dashed', 'border-color': '#e6550d' } },
    { selector: 'node.only-b', style: { 'border-width': 4, 'border-style': 'dashed', 'border-color': '#31a354' } },
    { selector: 'node.super', style: { 'shape': 'round-rectangle', 'width': function (e) { return 16 + 6.5 * String(e.data('label')).length; }, 'height': 22, 'background-color': 'data(color)', 'background-opacity': 0.9, 'label': 'data(label)', 'text-valign': 'center', 'color': '#fff', 'font-size': 11, 'font-weight': 'bold' } },
    { selector: 'edge', style: { 'curve-style': 'unbundled-bezier', 'control-point-distances': 'data(cpd)', 'control-point-weights': 'data(cpw)', 'edge-distances': 'node-position', 'width': 'data(width)', 'line-color': 'data(color)', 'opacity': 'data(op)', 'target-arrow-shape': 'triangle', 'target-arrow-color': 'data(color)', 'arrow-scale': 0.6 } },
    { selector: 'edge.only-a', style: { 'line-style': 'dashed' } },
    { selector: 'edge.only-b', style: { 'line-style': 'dotted' } },
    { selector: '.hidden', style: { 'display': 'none' } },
    { selector: '.faded', style: { 'opacity': 0.08 } },
    { selector: 'node.hl', style: { 'border-width': 3, 'border-color': '#111', 'z-index': 20 } },
    { selector: 'edge.hl', style: { 'opacity': 0.95, 'z-index': 19 } },
    { selector: 'node:selected', style: { 'border-width': 4, 'border-color': '#f0a000', 'border-style': 'solid' } },
    { selector: 'node.match', style: { 'underlay-color': '#ffd400', 'underlay-opacity': 0.8, 'underlay-padding': 6 } },
    { selector: 'node.current', style: { 'underlay-color': '#f07000', 'underlay-opacity': 0.6, 'underlay-padding': 8 } }
  ];
  var cy = cytoscape({
    container: cyDiv, elements: elements, style: style, layout: { name: 'preset', fit: false },
    autoungrabify: true, boxSelectionEnabled: true, selectionType: 'single', minZoom: 0.05, maxZoom: 6
  });

  // ------------------------------------------------------------------------------ visibility
  function nodeShown(n) {
    if (state.nodeStep > 0 && !(Math.abs(n.eff) > D.node_thresholds[state.nodeStep])) { return false; }
    if (CMP && state.show !== 'all' && n['in'] !== state.show) { return false; }
    return true;
  }
  function edgeShown(e) {
    return !(state.edgeStep > 0 && !(Math.abs(e.w) > D.edge_thresholds[state.edgeStep]));
  }
  function traced(visN, visE) {
    // backwards from the logit: each reached node's k strongest visible incoming edges
    var inc = {};
    visE.forEach(function (e) { (inc[e.t] = inc[e.t] || []).push(e); });
    Object.keys(inc).forEach(function (k) { inc[k].sort(function (a, b) { return Math.abs(b.w) - Math.abs(a.w) || (a.s < b.s ? -1 : 1); }); });
    var seen = { logit: true }, keptE = [], todo = ['logit'];
    while (todo.length) {
      var t = todo.shift();
      (inc[t] || []).slice(0, state.traceK).forEach(function (e) {
        keptE.push(e);
        if (!seen[e.s]) { seen[e.s] = true; todo.push(e.s); }
      });
    }
    return { nodes: visN.filter(function (n) { return seen[n.id]; }), edges: keptE };
  }
  var lastCounts = { nodes: 0, edges: 0 };
  function update() {
    var visN = D.nodes.filter(nodeShown);
    var vis = { logit: true };
    visN.forEach(function (n) { vis[n.id] = true; });
    var visE = edges.filter(function (e) { return vis[e.s] && vis[e.t] && edgeShown(e); });
    if (state.trace) {
      var tr = traced(visN, visE);
      visN = tr.nodes; visE = tr.edges;
      vis = { logit: true };
      visN.forEach(function (n) { vis[n.id] = true; });
    }
    var visEid = {};
    visE.forEach(function (e) { visEid[e.id] = true; });
    // collapsed groups: members hidden, one supernode with the members' edges summed
    var superOf = {};
    groups.forEach(function (g, gi) {
      if (!state.collapsed[g.name]) { return; }
      g.nodes.forEach(function (id) { if (vis[id] && !superOf[id]) { superOf[id] = 'super:' + gi; } });
    });
    cy.batch(function () {
      cy.elements('.super, .superedge').remove();
      cy.nodes('.fc').forEach(function (x) { x.toggleClass('hidden', !vis[x.id()] || !!superOf[x.id()]); });
      cy.edges('.fc').forEach(function (x) {
        var d = x.data();
        x.toggleClass('hidden', !visEid[x.id()] || !!superOf[d.source] || !!superOf[d.target]);
      });
      var made = {}, agg = {};
      groups.forEach(function (g, gi) {
        var sid = 'super:' + gi, members = g.nodes.filter(function (id) { return superOf[id] === sid; });
        if (!members.length) { return; }
        var x = 0, y = 0;
        members.forEach(function (id) { x += byId[id].x; y += byId[id].y; });
        superPos[sid] = { x: x / members.length, y: y / members.length };
        cy.add({ group: 'nodes', data: { id: sid, label: g.name + ' (' + members.length + ')', color: g.color, group: g.name }, position: superPos[sid], classes: 'super' });
        made[sid] = true;
      });
      visE.forEach(function (e) {
        var s = superOf[e.s] || e.s, t = superOf[e.t] || e.t;
        if (s === e.s && t === e.t) { return; }
        if (s === t) { return; }
        var k = s + '\u0000' + t;
        agg[k] = agg[k] || { s: s, t: t, w: 0 };
        agg[k].w += e.w;
      });
      Object.keys(agg).forEach(function (k, i) {
        var a = agg[k], r = Math.sqrt(Math.min(Math.abs(a.w) / wMax, 1));
        var cv = curve(a.s, a.t);
        cy.add({ group: 'edges', data: { id: 'superedge:' + i, source: a.s, target: a.t, cpd: cv.d, cpw: cv.w, width: 0.6 + 5 * r, op: 0.3 + 0.6 * r, color: a.w >= 0 ? POS : NEG, w: a.w }, classes: 'superedge' });
      });
    });
    ns[1].textContent = (state.nodeStep ? fmt(D.node_thresholds[state.nodeStep]).replace('+', '') : 'all') + ': ' + visN.length + ' nodes';
    es[1].textContent = (state.edgeStep ? fmt(D.edge_thresholds[state.edgeStep]).replace('+', '') : 'all') + ': ' + visE.length + ' of ' + edges.length + ' edges';
    lastCounts = { nodes: visN.length, edges: visE.length };
    setStatus();
  }
  var statusEl = document.getElementById('fc-status');
  function setStatus() {
    statusEl.setAttribute('data-visible-nodes', String(lastCounts.nodes));
    statusEl.setAttribute('data-visible-edges', String(lastCounts.edges));
    statusEl.setAttribute('data-supernodes', String(cy.nodes('.super').length));
    statusEl.setAttribute('data-selected', String(cy.nodes('.fc:selected').length));
    statusEl.setAttribute('data-panel', state.panel || '');
    statusEl.setAttribute('data-trace', state.trace ? '1' : '0');
  }

  // ----------------------------------------------------------------------------------- panel
  function edgeList(title, list, other) {
    var box = el('div');
    box.appendChild(el('h3', null, title));
    if (!list.length) { box.appendChild(el('p', { 'class': 'fc-hint' }, 'none')); return box; }
    var ul = el('ul', { 'class': 'fc-edges' });
    list.slice(0, 10).forEach(function (e) {
      var id = e[other];
      var li = el('li');
      var b = el('button', { type: 'button', 'class': 'fc-jump', 'data-node': id });
      b.appendChild(el('span', { 'class': 'fc-w ' + (e.w >= 0 ? 'pos' : 'neg') }, fmt(e.w)));
      var n = byId[id];
      b.appendChild(el('span', null, id + (n && labelOf(n) ? ' \u2014 ' + labelOf(n) : '')));
      if (id !== 'logit') { b.addEventListener('click', function () { focusNode(id); }); } else { b.disabled = true; }
      li.appendChild(b); ul.appendChild(li);
    });
    box.appendChild(ul);
    if (list.length > 10) { box.appendChild(el('p', { 'class': 'fc-hint' }, '\u2026 and ' + (list.length - 10) + ' more')); }
    return box;
  }
  function row(t, k, v, cls) {
    var tr = el('tr'); tr.appendChild(el('td', null, k));
    var td = el('td', cls ? { 'class': cls } : null, v); tr.appendChild(td); t.appendChild(tr); return td;
  }
  function openPanel(id) {
    var n = byId[id];
    if (!n) { return; }
    state.panel = id;
    cy.nodes('.current').removeClass('current');
    cy.getElementById(id).addClass('current');
    nodeBox.textContent = '';
    nodeBox.appendChild(el('h2', { id: 'fc-panel-title' }, labelOf(n) || n.id));
    var t = el('table', { id: 'fc-panel-table' });
    row(t, 'id', n.id);
    row(t, 'site', n.site + ' (' + n.kind + (n.layer >= 0 ? ', layer ' + n.layer : '') + ')');
    if (n.pos !== null) { row(t, 'position', n.pos + (n.tok !== null ? ' ' + JSON.stringify(n.tok) : '')); }
    row(t, 'feature', n.err ? 'error node (what the dictionary does not reconstruct)' : String(n.f));
    if (CMP) {
      row(t, 'in', n['in'] === 'both' ? 'both circuits' : 'only ' + (n['in'] === 'a' ? 'A (' + CMP.names[0] + ')' : 'B (' + CMP.names[1] + ')'));
      row(t, 'effect in A', fmt(n.effA), n.effA === null ? '' : (n.effA >= 0 ? 'pos' : 'neg'));
      row(t, 'effect in B', fmt(n.effB), n.effB === null ? '' : (n.effB >= 0 ? 'pos' : 'neg'));
    } else {
      row(t, 'effect', fmt(n.eff), n.eff >= 0 ? 'pos' : 'neg');
    }
    if (n.act) {
      row(t, 'mean act. clean', fmt(n.act.mc));
      row(t, 'mean act. patch', fmt(n.act.mp));
    }
    var labTd = row(t, 'label', '');
    var inp = el('input', { id: 'fc-label-input', type: 'text', placeholder: 'name this feature' });
    inp.value = labelOf(n);
    var save = el('button', { id: 'fc-label-save', type: 'button' }, 'set');
    function commit() { setLabel(n, inp.value); }
    save.addEventListener('click', commit);
    inp.addEventListener('keydown', function (ev) { if (ev.key === 'Enter') { commit(); } });
    labTd.appendChild(inp); labTd.appendChild(save);
    var np = row(t, 'Neuronpedia', '');
    if (n.url && n.url.indexOf('https://www.neuronpedia.org/') === 0) {
      np.appendChild(el('a', { id: 'fc-neuronpedia', href: n.url, target: '_blank', rel: 'noopener noreferrer' }, 'open feature page'));
    } else {
      np.textContent = n.err ? 'no page (error node)' : 'no page for this dictionary';
    }
    var gs = groups.filter(function (g) { return g.nodes.indexOf(n.id) >= 0; }).map(function (g) { return g.name; });
    if (gs.length) { row(t, 'groups', gs.join(', ')); }
    nodeBox.appendChild(t);
    nodeBox.appendChild(el('h3', null, 'Top activating contexts'));
    var cbox = el('div', { id: 'fc-contexts' });
    if (!n.act || !n.act.ctx.length) {
      cbox.appendChild(el('p', { 'class': 'fc-hint' }, 'no contexts recorded for this node'));
    } else {
      n.act.ctx.forEach(function (c) {
        var d = el('div', { 'class': 'fc-ctx' });
        c[0].forEach(function (tok, i) {
          d.appendChild(el(i === c[1] ? 'mark' : 'span', { 'class': 'fc-tok' }, showTok(tok)));
        });
        d.appendChild(el('span', { 'class': 'fc-act' }, fmt(c[2]) + ' \u00b7 ' + c[3]));
        cbox.appendChild(d);
      });
    }
    nodeBox.appendChild(cbox);
    var inE = edges.filter(function (e) { return e.t === id; }).sort(function (a, b) { return Math.abs(b.w) - Math.abs(a.w); });
    var outE = edges.filter(function (e) { return e.s === id; }).sort(function (a, b) { return Math.abs(b.w) - Math.abs(a.w); });
    var ib = edgeList('Strongest incoming edges', inE, 's'); ib.id = 'fc-in-edges'; nodeBox.appendChild(ib);
    var ob = edgeList('Strongest outgoing edges', outE, 't'); ob.id = 'fc-out-edges'; nodeBox.appendChild(ob);
    setStatus();
  }
  function focusNode(id) {
    var x = cy.getElementById(id);
    if (!x || !x.length) { return; }
    if (x.hasClass('hidden')) {  // a jump to a node the sliders hide: show everything again
      state.nodeStep = 0; state.edgeStep = 0; state.trace = false;  // (the default edge step may hide its edges)
      ns[0].value = '0'; es[0].value = '0'; traceBtn.classList.remove('on');
      update();
    }
    cy.nodes(':selected').unselect();
    x.select();
    cy.center(x);
    openPanel(id);
  }
  function setLabel(n, text) {
    var k = lkey(n.site, n.f);
    text = String(text).trim();
    if (text) { labels[k] = [n.site, n.f, text]; } else { delete labels[k]; }
    D.nodes.forEach(function (m) {
      if (m.site === n.site && m.f === n.f) { cy.getElementById(m.id).data('label', nodeLabel(m)); }
    });
    openPanel(n.id);
    runSearch();
  }

  // ---------------------------------------------------------------------------------- groups
  var msg = el('div', { id: 'fc-msg' });
  function renderGroups() {
    groupBox.textContent = '';
    groupBox.appendChild(el('h3', null, 'Groups (supernodes)'));
    var line = el('div');
    var name = el('input', { id: 'fc-group-name', type: 'text', placeholder: 'group name' });
    var make = el('button', { id: 'fc-group-make', type: 'button' }, 'group selected');
    make.addEventListener('click', function () { makeGroup(name.value); });
    line.appendChild(name); line.appendChild(make);
    groupBox.appendChild(line);
    groupBox.appendChild(msg);
    var ul = el('ul');
    groups.forEach(function (g) {
      var li = el('li', { 'class': 'fc-group' });
      li.appendChild(el('span', { 'class': 'fc-swatch', style: 'background:' + g.color }));
      li.appendChild(el('span', { 'class': 'fc-group-name' }, g.name));
      li.appendChild(document.createTextNode(' (' + g.nodes.length + ') '));
      var sel = el('button', { type: 'button', 'class': 'fc-group-select' }, 'select');
      sel.addEventListener('click', function () { cy.nodes(':selected').unselect(); g.nodes.forEach(function (id) { cy.getElementById(id).select(); }); setStatus(); });
      var col = el('button', { type: 'button', 'class': 'fc-group-collapse' + (state.collapsed[g.name] ? ' on' : '') }, state.collapsed[g.name] ? 'expand' : 'collapse');
      col.addEventListener('click', function () { state.collapsed[g.name] = !state.collapsed[g.name]; renderGroups(); update(); });
      var del = el('button', { type: 'button', 'class': 'fc-group-delete' }, 'delete');
      del.addEventListener('click', function () { groups = groups.filter(function (h) { return h !== g; }); delete state.collapsed[g.name]; renderGroups(); markGroups(); update(); });
      li.appendChild(sel); li.appendChild(col); li.appendChild(del);
      ul.appendChild(li);
    });
    groupBox.appendChild(ul);
    var dl = el('button', { id: 'fc-download', type: 'button', title: 'labels and groups as a JSON Lines file for discover --labels / render --labels' }, 'download labels/groups');
    dl.addEventListener('click', download);
    groupBox.appendChild(dl);
  }
  function markGroups() {
    cy.nodes('.fc').removeClass('grouped');
    groups.slice().reverse().forEach(function (g) {
      g.nodes.forEach(function (id) { var x = cy.getElementById(id); if (x.length) { x.addClass('grouped'); x.data('gcolor', g.color); } });
    });
  }
  function makeGroup(name) {
    name = String(name).trim();
    var ids = cy.nodes('.fc:selected').map(function (x) { return x.id(); });
    if (!ids.length) { msg.textContent = 'select nodes first (shift-click or shift-drag)'; return; }
    if (!name) { name = 'group ' + (groups.length + 1); }
    if (groups.some(function (g) { return g.name === name; })) { msg.textContent = 'a group named "' + name + '" exists'; return; }
    msg.textContent = '';
    groups.push({ name: name, nodes: ids, color: GROUP_COLORS[groups.length % GROUP_COLORS.length] });
    renderGroups(); markGroups(); update();
  }
  function exportText() {
    var lines = [];
    Object.keys(labels).forEach(function (k) { var l = labels[k]; lines.push(JSON.stringify({ site: l[0], feature: l[1], label: l[2] })); });
    groups.forEach(function (g) { lines.push(JSON.stringify({ group: g.name, nodes: g.nodes })); });
    return lines.map(function (l) { return l + '\n'; }).join('');
  }
  function download() {
    var blob = new Blob([exportText()], { type: 'application/x-ndjson' });
    var a = el('a', { download: 'labels.jsonl' });
    a.href = URL.createObjectURL(blob);
    document.body.appendChild(a); a.click(); document.body.removeChild(a);
    setTimeout(function () { URL.revokeObjectURL(a.href); }, 10000);
  }

  // ---------------------------------------------------------------------------------- search
  function runSearch() {
    var q = search.value.trim().toLowerCase();
    results.textContent = '';
    cy.nodes('.match').removeClass('match');
    if (!q) { statusEl.setAttribute('data-search-matches', '0'); return; }
    var hits = D.nodes.filter(function (n) {
      return n.id.toLowerCase().indexOf(q) >= 0 || labelOf(n).toLowerCase().indexOf(q) >= 0 || (n.tok !== null && n.tok.toLowerCase().indexOf(q) >= 0);
    });
    hits.forEach(function (n) { cy.getElementById(n.id).addClass('match'); });
    hits.slice(0, 40).forEach(function (n) {
      var b = el('button', { type: 'button', 'class': 'fc-result', 'data-node': n.id }, n.id + (labelOf(n) ? ' \u2014 ' + labelOf(n) : '') + '  ' + fmt(n.eff));
      b.addEventListener('click', function () { results.textContent = ''; focusNode(n.id); });
      results.appendChild(b);
    });
    statusEl.setAttribute('data-search-matches', String(hits.length));
  }
  search.addEventListener('input', runSearch);
  search.addEventListener('keydown', function (ev) {
    if (ev.key === 'Enter') { var first = results.querySelector('button'); if (first) { first.click(); } }
    if (ev.key === 'Escape') { search.value = ''; runSearch(); }
  });

  // ---------------------------------------------------------------------------------- events
  ns[0].addEventListener('input', function () { state.nodeStep = +ns[0].value; update(); });
  es[0].addEventListener('input', function () { state.edgeStep = +es[0].value; update(); });
  traceBtn.addEventListener('click', function () { state.trace = !state.trace; traceBtn.classList.toggle('on', state.trace); update(); });
  kIn.addEventListener('change', function () { var k = parseInt(kIn.value, 10); state.traceK = isFinite(k) && k > 0 ? k : 1; update(); });
  function fitView() {  // from the known positions: cheaper than cy.fit, which measures every label and edge
    var xs1 = [D.logit.x], ys1 = [D.logit.y];
    D.nodes.forEach(function (n) { xs1.push(n.x); ys1.push(n.y); });
    D.rows.forEach(function (r) { ys1.push(r[1]); });
    var x0 = Math.min.apply(null, xs1) - 90, x1 = Math.max.apply(null, xs1) + 30;
    var y0 = Math.min.apply(null, ys1) - 30, y1 = Math.max.apply(null, ys1) + (D.columns.length ? 60 : 30);
    var z = Math.min(cy.width() / (x1 - x0), cy.height() / (y1 - y0), 1.5);
    cy.viewport({ zoom: z, pan: { x: cy.width() / 2 - z * (x0 + x1) / 2, y: cy.height() / 2 - z * (y0 + y1) / 2 } });
  }
  fitBtn.addEventListener('click', fitView);
  if (showSel) { showSel.addEventListener('change', function () { state.show = showSel.value; update(); }); }
  cy.on('tap', 'node.fc', function (ev) { openPanel(ev.target.id()); });
  cy.on('tap', 'node.super', function (ev) {
    var g = ev.target.data('group');
    nodeBox.textContent = '';
    nodeBox.appendChild(el('h2', null, 'group: ' + g));
    groups.filter(function (h) { return h.name === g; }).forEach(function (h) {
      var ul = el('ul', { 'class': 'fc-edges' });
      h.nodes.forEach(function (id) { var li = el('li'); var b = el('button', { type: 'button' }, id + (byId[id] && labelOf(byId[id]) ? ' \u2014 ' + labelOf(byId[id]) : '')); b.addEventListener('click', function () { focusNode(id); }); li.appendChild(b); ul.appendChild(li); });
      nodeBox.appendChild(ul);
    });
  });
  cy.on('select unselect', 'node', function () { setStatus(); });
  cy.on('mouseover', 'node.fc, node.super, node.logit', function (ev) {
    var es = ev.target.connectedEdges().filter(function (x) { return !x.hasClass('hidden'); });  // shown edges only
    var nb = ev.target.union(es).union(es.connectedNodes());
    cy.elements().not(nb).not('.rowlabel, .collabel').addClass('faded');
    nb.addClass('hl');
    statusEl.setAttribute('data-hover', ev.target.id());
    statusEl.setAttribute('data-highlighted', String(nb.nodes().length));
  });
  cy.on('mouseout', 'node', function () {
    cy.elements().removeClass('faded hl');
    statusEl.setAttribute('data-hover', '');
    statusEl.setAttribute('data-highlighted', '0');
  });

  renderGroups();
  markGroups();
  update();
  fitView();
  window.fcExplorer = { cy: cy, state: state, exportText: exportText, update: update, focusNode: focusNode };
  if (window.performance && performance.mark) { performance.mark('fc-ready'); }
  statusEl.setAttribute('data-ready-ms', String(Math.round(window.performance ? performance.now() : 0)));
  statusEl.setAttribute('data-script-ms', String(Math.round(window.performance ? performance.now() - T0 : 0)));
  statusEl.setAttribute('data-done', '1');
})();
