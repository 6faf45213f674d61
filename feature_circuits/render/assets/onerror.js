(function () {
  // every uncaught error and rejected promise is written into #fc-errors (read by the browser tests)
  function report(msg) {
    var box = document.getElementById('fc-errors');
    if (!box) { return; }
    var d = document.createElement('div');
    d.className = 'fc-error';
    d.textContent = String(msg);
    box.appendChild(d);
  }
  window.onerror = function (msg, src, line, col) { report(msg + ' @' + src + ':' + line + ':' + col); };
  window.addEventListener('unhandledrejection', function (ev) { report('unhandled rejection: ' + ev.reason); });
})();
