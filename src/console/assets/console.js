// task-broker web console: live lists (server-sent events) and the exec session player.
// Loaded as a module from /ui/assets (the CSP allows no inline script). Everything it inserts is
// either HTML the broker rendered (escaped there) or text set with textContent.

const live = document.querySelectorAll('[data-live]');
const announcer = document.getElementById('live');

/** Replaces the children of `target` with those of `html`, reusing nodes whose key and version are unchanged (keeps focus and typed comments). */
function merge(target, html) {
  const next = document.createElement('template');
  next.innerHTML = html;
  const old = new Map();
  for (const el of target.children) if (el.dataset.key) old.set(el.dataset.key, el);
  const fresh = [];
  let added = 0;
  for (const el of [...next.content.children]) {
    const key = el.dataset.key;
    const prev = key ? old.get(key) : undefined;
    if (prev && prev.dataset.version === el.dataset.version) fresh.push(prev);
    else {
      if (!prev && key !== 'empty') added++;
      fresh.push(el);
    }
  }
  target.replaceChildren(...fresh);
  return added;
}

async function refresh(el) {
  const res = await fetch(el.dataset.fragment, { headers: { accept: 'text/html' }, credentials: 'same-origin' });
  if (res.status === 401) {
    location.assign('/ui/signin');
    return;
  }
  if (!res.ok) return;
  const added = merge(el, await res.text());
  if (added > 0 && announcer) announcer.textContent = `${added} new ${el.dataset.live === 'approvals' ? 'approval request' : 'task'}${added === 1 ? '' : 's'}`;
}

if (live.length > 0) {
  const events = new EventSource('/ui/events');
  for (const el of live) events.addEventListener(el.dataset.live, () => void refresh(el));
  // After a reconnect, anything missed meanwhile.
  events.addEventListener('open', () => {
    for (const el of live) if (el.dataset.seen) void refresh(el);
    for (const el of live) el.dataset.seen = '1';
  });
}

// ---------------------------------------------------------------------------------------------
// The session player: what was typed and what came back, in order, in a terminal view of inert text.

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

for (const player of document.querySelectorAll('.player')) {
  const button = player.querySelector('.play');
  const speed = player.querySelector('.speed');
  const term = player.querySelector('.term');
  let run = 0;
  button.addEventListener('click', async () => {
    const mine = ++run;
    term.replaceChildren();
    player.dataset.state = 'playing';
    button.textContent = 'Replay again';
    const res = await fetch(player.dataset.recording, { headers: { accept: 'application/json' }, credentials: 'same-origin' });
    const body = await res.json().catch(() => ({ problem: 'the recording could not be read' }));
    if (!res.ok || body.problem || !Array.isArray(body.events)) {
      const p = document.createElement('span');
      p.className = 'problem';
      p.textContent = body.problem ?? body.error?.message ?? `the recording could not be read (${res.status})`;
      term.append(p);
      player.dataset.state = 'error';
      return;
    }
    let prev = 0;
    for (const ev of body.events) {
      if (mine !== run) return;
      const factor = Number(speed.value);
      if (factor > 0) await sleep(Math.min(1000, Math.max(0, ev.t - prev) / factor));
      prev = ev.t;
      const span = document.createElement('span');
      span.className = ev.kind;
      span.textContent = ev.kind === 'end' ? `\n[${ev.text}]\n` : ev.text;
      term.append(span);
      term.scrollTop = term.scrollHeight;
    }
    if (mine === run) player.dataset.state = 'done';
  });
}

// The audit chain's verdict, when the first pass over the log was still running as the page was made.
for (const el of document.querySelectorAll('[data-chain]')) {
  void (async () => {
    const res = await fetch(el.dataset.chain, { headers: { accept: 'text/html' }, credentials: 'same-origin' });
    if (!res.ok) return;
    const next = document.createElement('template');
    next.innerHTML = await res.text();
    el.replaceWith(...next.content.children);
  })();
}
