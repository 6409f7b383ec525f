// The one-shot drawing page: a canvas, the user's classes, and live predictions from /api/predict.
"use strict";

(function () {
  const LINE_WIDTH = 13; // px on the 280 px canvas: about Omniglot's stroke width (5 px of 105)
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const nameInput = document.getElementById("class-name");
  const addButton = document.getElementById("add");
  const hint = document.getElementById("hint");
  const predicted = document.getElementById("predicted");
  const bars = document.getElementById("bars");
  const errorBox = document.getElementById("error");
  const classList = document.getElementById("classes");
  const classCount = document.getElementById("class-count");
  const noClasses = document.getElementById("no-classes");

  const classes = []; // [{name, drawings: [data URL]}]
  let strokes = []; // [[{x, y}]]: the drawing on the canvas, so that a stroke can be undone
  let current = null; // the stroke being drawn
  let requestId = 0; // answers to older requests are dropped
  let fixedWays = null; // a model with a fixed classifier head (MAML...) needs exactly this many classes

  // ---- drawing
  function resetCanvas() {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, pad.width, pad.height);
  }

  function drawStroke(points) {
    ctx.strokeStyle = "#000";
    ctx.fillStyle = "#000";
    ctx.lineWidth = LINE_WIDTH;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    if (points.length === 1) {
      ctx.beginPath();
      ctx.arc(points[0].x, points[0].y, LINE_WIDTH / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    ctx.beginPath();
    ctx.moveTo(points[0].x, points[0].y);
    for (let i = 1; i < points.length; i++) ctx.lineTo(points[i].x, points[i].y);
    ctx.stroke();
  }

  function redraw() {
    resetCanvas();
    strokes.forEach(drawStroke);
  }

  function point(clientX, clientY) {
    const r = pad.getBoundingClientRect();
    return { x: (clientX - r.left) * (pad.width / r.width), y: (clientY - r.top) * (pad.height / r.height) };
  }

  function startStroke(clientX, clientY) {
    current = [point(clientX, clientY)];
    strokes.push(current);
    drawStroke(current);
  }

  function extendStroke(clientX, clientY) {
    if (!current) return;
    const p = point(clientX, clientY);
    const last = current[current.length - 1];
    current.push(p);
    drawStroke([last, p]);
  }

  function endStroke() {
    if (!current) return;
    current = null;
    redraw(); // one clean path per stroke, as a repeated drawing would give
    drawingChanged();
  }

  if (window.PointerEvent) {
    // Mouse, pen and touch alike.
    pad.addEventListener("pointerdown", (e) => {
      if (e.button !== 0) return;
      e.preventDefault();
      pad.setPointerCapture(e.pointerId);
      startStroke(e.clientX, e.clientY);
    });
    pad.addEventListener("pointermove", (e) => {
      if (!current) return;
      e.preventDefault();
      const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
      (events.length ? events : [e]).forEach((c) => extendStroke(c.clientX, c.clientY));
    });
    pad.addEventListener("pointerup", endStroke);
    pad.addEventListener("pointercancel", endStroke);
  } else {
    // Older browsers: mouse and touch events.
    pad.addEventListener("mousedown", (e) => { e.preventDefault(); startStroke(e.clientX, e.clientY); });
    window.addEventListener("mousemove", (e) => extendStroke(e.clientX, e.clientY));
    window.addEventListener("mouseup", endStroke);
    pad.addEventListener("touchstart", (e) => {
      e.preventDefault();
      const t = e.changedTouches[0];
      startStroke(t.clientX, t.clientY);
    }, { passive: false });
    pad.addEventListener("touchmove", (e) => {
      e.preventDefault();
      const t = e.changedTouches[0];
      extendStroke(t.clientX, t.clientY);
    }, { passive: false });
    pad.addEventListener("touchend", endStroke);
    pad.addEventListener("touchcancel", endStroke);
  }

  function isBlank() {
    return strokes.length === 0;
  }

  function clearDrawing() {
    strokes = [];
    current = null;
    redraw();
    drawingChanged();
  }

  document.getElementById("clear").addEventListener("click", clearDrawing);
  document.getElementById("undo").addEventListener("click", () => {
    strokes.pop();
    redraw();
    drawingChanged();
  });

  // ---- classes
  function findClass(name) {
    return classes.find((c) => c.name === name);
  }

  function updateAddButton() {
    const name = nameInput.value.trim();
    addButton.textContent = name && findClass(name) ? `Add drawing to “${name}”` : "Add as new class";
  }

  function addDrawing(name) {
    if (isBlank()) {
      showError("Draw something first, then add it.");
      return;
    }
    const drawing = pad.toDataURL("image/png");
    const existing = findClass(name);
    if (existing) existing.drawings.push(drawing);
    else classes.push({ name: name, drawings: [drawing] });
    nameInput.value = "";
    updateAddButton();
    renderClasses();
    clearDrawing();
  }

  function defaultName() {
    for (let i = classes.length + 1; ; i++) {
      if (!findClass(`Class ${i}`)) return `Class ${i}`;
    }
  }

  document.getElementById("add-form").addEventListener("submit", (e) => {
    e.preventDefault();
    addDrawing(nameInput.value.trim() || defaultName());
  });
  nameInput.addEventListener("input", updateAddButton);

  function renderClasses() {
    classList.replaceChildren();
    classes.forEach((c, index) => {
      const li = document.createElement("li");
      li.className = "class-item";
      const title = document.createElement("div");
      title.className = "class-title";
      const name = document.createElement("span");
      name.className = "class-name";
      name.textContent = c.name;
      const count = document.createElement("span");
      count.className = "count";
      count.textContent = c.drawings.length === 1 ? "1 drawing" : `${c.drawings.length} drawings`;
      title.append(name, count);
      const thumbs = document.createElement("div");
      thumbs.className = "thumbs";
      c.drawings.forEach((d, i) => {
        const img = document.createElement("img");
        img.src = d;
        img.alt = `Drawing ${i + 1} of ${c.name}`;
        img.width = 56;
        img.height = 56;
        thumbs.append(img);
      });
      const actions = document.createElement("div");
      actions.className = "class-actions";
      const more = document.createElement("button");
      more.type = "button";
      more.textContent = "Add drawing";
      more.setAttribute("aria-label", `Add the current drawing to ${c.name}`);
      more.addEventListener("click", () => addDrawing(c.name));
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove class ${c.name}`);
      remove.addEventListener("click", () => {
        classes.splice(index, 1);
        renderClasses();
        updateAddButton();
        drawingChanged();
      });
      actions.append(more, remove);
      li.append(title, thumbs, actions);
      classList.append(li);
    });
    classCount.textContent = `(${classes.length})`;
    noClasses.hidden = classes.length > 0;
    const missing = waysMissing();
    hint.textContent = missing > 0
      ? `Draw a character, name it, then press “Add as new class” (${missing} more needed).`
      : missing < 0 ? `This model tells exactly ${fixedWays} classes apart: remove ${-missing}.`
        : "Draw a character to see its class, or add it as a new class.";
  }

  // Classes still to add before a prediction (negative: too many for a fixed-head model).
  function waysMissing() {
    return fixedWays ? fixedWays - classes.length : Math.max(0, 2 - classes.length);
  }

  // ---- prediction
  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  // predicted.dataset.state: "idle" (nothing to predict), "busy" (a request for the current drawing is out),
  // "done" (the prediction shown is the current drawing's) or "error".
  function showIdle(message, state) {
    predicted.dataset.state = state || "idle";
    predicted.textContent = message;
    predicted.className = "predicted empty";
    bars.replaceChildren();
  }

  function showPrediction(result) {
    predicted.dataset.state = "done";
    predicted.className = "predicted";
    predicted.replaceChildren();
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = "Looks like ";
    const value = document.createElement("strong");
    value.id = "predicted-label";
    value.textContent = result.predicted;
    predicted.append(label, value);
    bars.replaceChildren();
    Object.entries(result.probabilities)
      .sort((a, b) => b[1] - a[1])
      .forEach(([name, p]) => {
        const li = document.createElement("li");
        li.className = name === result.predicted ? "bar best" : "bar";
        const text = document.createElement("span");
        text.className = "bar-name";
        text.textContent = name;
        const track = document.createElement("span");
        track.className = "bar-track";
        track.setAttribute("aria-hidden", "true");
        const fill = document.createElement("span");
        fill.className = "bar-fill";
        fill.style.width = `${(100 * p).toFixed(1)}%`;
        track.append(fill);
        const pct = document.createElement("span");
        pct.className = "bar-value";
        pct.textContent = `${(100 * p).toFixed(1)}%`;
        li.dataset.label = name;
        li.dataset.probability = String(p);
        li.append(text, track, pct);
        bars.append(li);
      });
  }

  async function drawingChanged() {
    const id = ++requestId;
    showError("");
    const missing = waysMissing();
    if (missing !== 0) {
      const need = fixedWays ? `exactly ${fixedWays}` : "at least 2";
      showIdle(missing < 0 ? `This model tells exactly ${fixedWays} classes apart: remove ${-missing}.`
        : `Add ${need} classes (${missing} more), then draw a character.`);
      return;
    }
    if (isBlank()) {
      showIdle("Draw a character to see which class it is.");
      return;
    }
    const support = [];
    classes.forEach((c) => c.drawings.forEach((d) => support.push({ label: c.name, image: d })));
    predicted.classList.add("busy");
    predicted.dataset.state = "busy";
    try {
      const response = await fetch("/api/predict", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ support: support, query: pad.toDataURL("image/png") }),
      });
      const body = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
      if (id !== requestId) return; // a newer drawing is on its way
      if (!response.ok) throw new Error(body.error || `the server answered ${response.status}`);
      showPrediction(body);
    } catch (err) {
      if (id !== requestId) return;
      showIdle("No prediction.", "error");
      showError(`Could not predict: ${err.message}`);
    } finally {
      if (id === requestId) predicted.classList.remove("busy");
    }
  }

  // ---- start
  fetch("/api/info")
    .then((r) => r.json())
    .then((info) => {
      const size = info.image_size ? `, which sees drawings at ${info.image_size}×${info.image_size} pixels` : "";
      const ways = info.ways ? ` It tells exactly ${info.ways} classes apart.` : "";
      document.getElementById("model").textContent =
        `Model: ${info.algorithm || "unknown"}${info.dataset ? ` trained on ${info.dataset}` : ""}${size}.${ways}`;
      if (info.ways) {
        fixedWays = info.ways;
        renderClasses();
        drawingChanged();
      }
    })
    .catch(() => { document.getElementById("model").textContent = "Model information unavailable."; });
  redraw();
  renderClasses();
  drawingChanged();
  document.body.dataset.ready = "true";
})();
