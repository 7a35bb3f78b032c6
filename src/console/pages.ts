/**
 * The console's pages, server-rendered: every value through `html` (escaped) and every text from
 * outside through `visible` (control and bidi characters shown as escapes). No inline script or style:
 * the one script and the one stylesheet are files (src/console/assets), as the CSP demands.
 */
import type { ApprovalRequest } from '../approvals/model.ts';
import { approvalCount, effectiveState } from '../approvals/model.ts';
import type { AuditRecord, VerifyResult } from '../audit/types.ts';
import { eventLine, summaryLine, type Summary } from '../audit/show.ts';
import type { TaskStateView } from '../tasks/history.ts';
import { ttlWords, type GrantWords } from './grants.ts';
import { html, raw, visible, type Html } from './html.ts';
import type { Session } from './session.ts';
import { kubectlOf, recordingOf, recordTime } from './timeline.ts';

export const ASSET_VERSION = '1';

export interface Layout {
  title: string;
  session?: Session | undefined;
  /** Which tab is current. */
  nav?: 'approvals' | 'tasks' | undefined;
  /** A message at the top: what just happened, or what was refused. */
  flash?: { kind: 'ok' | 'error'; text: string } | undefined;
}

export function page(layout: Layout, body: Html): string {
  const s = layout.session;
  const current = (tab: string) => (layout.nav === tab ? raw(' aria-current="page"') : '');
  return html`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">

${s ? html`<meta name="csrf-token" content="${s.csrf}">` : ''}
<title>${layout.title} · task-broker</title>
<link rel="stylesheet" href="/ui/assets/console.css?v=${ASSET_VERSION}">
<link rel="icon" href="/ui/assets/favicon.svg" type="image/svg+xml">
<script type="module" src="/ui/assets/console.js?v=${ASSET_VERSION}"></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
  <span class="brand">task-broker</span>
  ${
    s
      ? html`<nav aria-label="Console"><a href="/ui/approvals"${current('approvals')}>Approvals</a><a href="/ui/tasks"${current('tasks')}>Tasks</a></nav>
  <div class="who"><span class="subject" title="${visible(s.caller.subject)}">${visible(who(s))}</span>
  <form method="post" action="/ui/signout" class="inline"><input type="hidden" name="csrf" value="${s.csrf}"><button type="submit">Sign out</button></form></div>`
      : ''
  }
</header>
<main id="main" tabindex="-1">
${layout.flash ? html`<p class="flash ${layout.flash.kind}" role="${layout.flash.kind === 'error' ? 'alert' : 'status'}">${visible(layout.flash.text)}</p>` : ''}
${body}
</main>
<div id="live" class="sr-only" aria-live="polite"></div>
</body>
</html>
`.value;
}

function who(s: Session): string {
  const p = s.caller.principal;
  const name = p.startsWith('person:') ? p.slice('person:'.length) : s.caller.agent ? `agent ${s.caller.agent}` : s.caller.subject;
  return `Signed in as ${name}`;
}

export function signInPage(issuers: Array<{ issuer: string; clientId: string }>, flash?: Layout['flash']): string {
  const body =
    issuers.length === 0
      ? html`<h1>Sign in</h1><p class="empty">No identity provider is set up for people to sign in: the policy's <code>issuers</code> name no <code>login.clientId</code> (docs/console.md).</p>`
      : html`<h1>Sign in</h1>
<p>Sign in with your identity provider to see and decide approval requests and review tasks.</p>
<ul class="issuers">${issuers.map((i, n) => html`<li><a class="button" href="/ui/signin/start?issuer=${n}">Sign in at ${visible(new URL(i.issuer).host)}</a> <span class="muted">${visible(i.issuer)}</span></li>`)}</ul>`;
  return page({ title: 'Sign in', flash }, body);
}

/** The page the callback answers with: a same-site navigation onward, so the SameSite=Strict cookie is sent with it. */
export function signedInPage(next: string): string {
  return html`<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="0;url=${next}"><title>Signed in · task-broker</title><link rel="stylesheet" href="/ui/assets/console.css?v=${ASSET_VERSION}"><link rel="icon" href="/ui/assets/favicon.svg" type="image/svg+xml"></head>
<body><main id="main"><p>Signed in. <a href="${next}">Continue to the console</a>.</p></main></body></html>`.value;
}

export function errorPage(status: number, message: string, session?: Session): string {
  return page({ title: status === 404 ? 'Not found' : 'Refused', session }, html`<h1>${status === 404 ? 'Not found' : status === 401 ? 'Signed out' : 'Refused'}</h1><p class="flash error" role="alert">${visible(message)}</p><p><a href="/ui/approvals">Approvals</a> · <a href="/ui/tasks">Tasks</a></p>`);
}

// ---------------------------------------------------------------------------------------------
// Approvals

export interface ApprovalCard {
  request: ApprovalRequest;
  grant: GrantWords;
  /** Why this person may not decide it, or undefined when they may. */
  cannot?: string | undefined;
  mine: boolean;
}

export function approvalsPage(session: Session, cards: ApprovalCard[], now: Date, flash?: Layout['flash']): string {
  return page(
    { title: 'Approvals', session, nav: 'approvals', flash },
    html`<h1>Pending approvals</h1>
<p class="muted">New requests appear here as they arrive.</p>
<section id="approvals" data-live="approvals" data-fragment="/ui/approvals/list" aria-label="Pending approval requests">${approvalsList(session, cards, now)}</section>`,
  );
}

export function approvalsList(session: Session, cards: ApprovalCard[], now: Date): Html {
  if (cards.length === 0) return html`<p class="empty" data-key="empty">No approval request waits for you. Requests you may decide, and your own, appear here when they are made.</p>`;
  return html`${cards.map((c) => approvalCard(session, c, now))}`;
}

function approvalCard(session: Session, card: ApprovalCard, now: Date): Html {
  const r = card.request;
  const state = effectiveState(r, now);
  const approved = r.decisions.filter((d) => d.decision === 'approve');
  const id = r.id;
  const version = `${state}:${r.decisions.length}:${card.cannot ?? ''}`;
  const g = card.grant;
  return html`<article class="card approval" id="${id}" data-key="${id}" data-version="${version}" aria-labelledby="${id}-title">
<h2 id="${id}-title"><span class="agent">${visible(r.requester.agent || r.requester.subject)}</span> asks for <span class="template">${visible(r.template)}</span> in <span class="ns">${visible(r.namespace)}</span></h2>
<dl class="facts">
<dt>Requester</dt><dd>${visible(r.requester.subject)}${card.mine ? html` <strong>(you)</strong>` : ''}</dd>
<dt>Task</dt><dd>${visible(r.name)}, for ${ttlWords(r.ttl)}</dd>
<dt>Reason</dt><dd class="reason">${r.reason === undefined ? html`<span class="muted">none given</span>` : visible(r.reason)}</dd>
<dt>Approvals</dt><dd>${approvalCount(r)} of ${r.required}${approved.length ? html`: ${approved.map((d, i) => html`${i ? ', ' : ''}${visible(d.subject)}${d.reason ? html` (“${visible(d.reason)}”)` : ''}`)}` : ''}</dd>
<dt>Approvers</dt><dd>${r.approvers.join(', ')}</dd>
<dt>Expires</dt><dd><time datetime="${r.expiresAt}">${r.expiresAt.replace('T', ' ').replace(/\.\d+Z$/, 'Z')}</time></dd>
<dt>Request</dt><dd><code>${id}</code></dd>
</dl>
<h3>What it grants</h3>
${g.clusterRole !== undefined ? html`<p>the ClusterRole <code>${visible(g.clusterRole)}</code> in ${visible(r.namespace)} (its rules could not be read)</p>` : ''}
<ul class="grants">${g.lines.map((l) => html`<li><span class="verbs">${l.verbs.join(', ')}</span> on <span class="res">${l.resources.map(visible).join(', ')}</span> in <span class="ns">${l.namespaces.map(visible).join(', ')}</span></li>`)}</ul>
${
  g.gated.length
    ? html`<ul class="gated">${g.gated.map((x) => html`<li class="${x.persistent ? 'persistent' : ''}">${x.persistent ? html`<strong class="flag">Can leave access behind:</strong> ` : html`<strong class="flag gate">Gated:</strong> `}<code>${visible(x.pair)}</code>: ${x.reason}</li>`)}</ul>`
    : ''
}
${
  card.cannot
    ? html`<p class="cannot">${visible(card.cannot)}</p>`
    : html`<form method="post" action="/ui/approvals/${id}/decide" class="decide">
<input type="hidden" name="csrf" value="${session.csrf}">
<label for="${id}-comment">Comment <span class="muted">(required to deny)</span></label>
<textarea id="${id}-comment" name="comment" rows="2" maxlength="1024"></textarea>
<div class="buttons"><button type="submit" name="decision" value="approve" class="approve">Approve</button><button type="submit" name="decision" value="deny" class="deny">Deny</button></div>
</form>`
}
</article>`;
}

// ---------------------------------------------------------------------------------------------
// Tasks

export interface TaskFilter {
  agent?: string | undefined;
  template?: string | undefined;
  namespace?: string | undefined;
  state?: string | undefined;
}

export function tasksPage(session: Session, tasks: TaskStateView[], filter: TaskFilter, choices: { agents: string[]; templates: string[]; namespaces: string[] }, flash?: Layout['flash']): string {
  const select = (name: keyof TaskFilter, label: string, values: string[]) =>
    html`<label>${label} <select name="${name}"><option value="">any</option>${values.map((v) => html`<option${filter[name] === v ? raw(' selected') : ''}>${visible(v)}</option>`)}</select></label>`;
  const query = new URLSearchParams(Object.entries(filter).filter((e): e is [string, string] => typeof e[1] === 'string' && e[1] !== '')).toString();
  return page(
    { title: 'Tasks', session, nav: 'tasks', flash },
    html`<h1>Tasks</h1>
<form method="get" action="/ui/tasks" class="filters" aria-label="Filter tasks">
${select('agent', 'Agent', choices.agents)}${select('template', 'Template', choices.templates)}${select('namespace', 'Namespace', choices.namespaces)}${select('state', 'State', ['active', 'ended', 'expired', 'revoked', 'cleaned'])}
<button type="submit">Filter</button>
</form>
<section id="tasks" data-live="tasks" data-fragment="/ui/tasks/list${query ? `?${query}` : ''}" aria-label="Tasks">${tasksList(tasks, filter)}</section>`,
  );
}

export function tasksList(tasks: TaskStateView[], filter: TaskFilter): Html {
  const filtered = Object.values(filter).some((v) => v);
  if (tasks.length === 0) {
    return html`<p class="empty" data-key="empty">${filtered ? 'No task matches these filters.' : 'No task is active, and none ended recently. Tasks appear here when agents start them.'}</p>`;
  }
  return html`<ul class="tasks">${tasks.map(
    (t) => html`<li class="card task" data-key="${t.id}" data-version="${t.state}:${t.endedAt ?? ''}">
<a href="/ui/tasks/${t.id}"><span class="name">${visible(t.name)}</span></a> <span class="state ${t.state}">${t.state}</span>
<div class="meta">agent <b>${visible(t.agent)}</b> · template <b>${visible(t.template)}</b> · namespace <b>${visible(t.namespace)}</b></div>
<div class="meta muted">${t.state === 'active' ? html`started ${short(t.createdAt)}, until ${short(t.expiresAt)}` : html`ended ${short(t.endedAt ?? '')}${t.endedBy ? html` by ${visible(t.endedBy)}` : ''}`}</div>
</li>`,
  )}</ul>`;
}

function short(iso: string): string {
  return iso.replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

/** The chain's verdict, or why there is none, or that the first pass is still running. */
export type ChainView = VerifyResult | { unavailable: string } | { pending: true };

export function chainLine(chain: ChainView): Html {
  if ('pending' in chain) return html`<p class="chain unknown" data-chain="/ui/chain" role="status">Audit chain: being checked (the first pass over the log)…</p>`;
  if ('unavailable' in chain) return html`<p class="chain unknown">Audit chain: ${chain.unavailable}</p>`;
  if (chain.ok) return html`<p class="chain ok" role="status">Audit chain verifies: ${chain.records} records, each tied to the one before.</p>`;
  return html`<p class="chain broken" role="alert">Audit chain broken at line ${chain.line}${chain.seq === undefined ? '' : ` (seq ${chain.seq})`}: ${visible(chain.reason)}. Records after it are not trusted.</p>`;
}

export interface TimelinePage {
  task: TaskStateView | undefined;
  id: string;
  records: AuditRecord[];
  total: number;
  summary: Summary | undefined;
  offset: number;
  pageSize: number;
  chain: ChainView;
  /** The person may end it (the policy lets the task's own agent end it). */
  canEnd: boolean;
}

export function taskPage(session: Session, p: TimelinePage, flash?: Layout['flash']): string {
  const t = p.task;
  const pages = Math.max(1, Math.ceil(p.total / p.pageSize));
  const current = Math.floor(p.offset / p.pageSize) + 1;
  const nav =
    pages > 1
      ? html`<nav class="pager" aria-label="Timeline pages">${current > 1 ? html`<a href="/ui/tasks/${p.id}?offset=${p.offset - p.pageSize}" rel="prev">Earlier</a>` : ''}<span>page ${current} of ${pages} (${p.total} events)</span>${current < pages ? html`<a href="/ui/tasks/${p.id}?offset=${p.offset + p.pageSize}" rel="next">Later</a>` : ''}</nav>`
      : '';
  return page(
    { title: `Task ${t?.name ?? p.id}`, session, nav: 'tasks', flash },
    html`<h1>Task ${visible(t?.name ?? p.id)}</h1>
${
  t
    ? html`<dl class="facts"><dt>Id</dt><dd><code>${t.id}</code></dd><dt>State</dt><dd><span class="state ${t.state}">${t.state}</span></dd><dt>Agent</dt><dd>${visible(t.agent)}</dd><dt>Template</dt><dd>${visible(t.template)}</dd><dt>Namespace</dt><dd>${visible(t.namespace)}</dd>
<dt>Started</dt><dd>${short(t.createdAt)}</dd><dt>${t.state === 'active' ? 'Until' : 'Ended'}</dt><dd>${t.state === 'active' ? short(t.expiresAt) : short(t.endedAt ?? '')}</dd>${t.reason ? html`<dt>Reason</dt><dd class="reason">${visible(t.reason)}</dd>` : ''}</dl>`
    : ''
}
${
  p.canEnd
    ? html`<form method="post" action="/ui/tasks/${p.id}/end" class="inline"><input type="hidden" name="csrf" value="${session.csrf}"><button type="submit" class="deny">End this task</button></form>`
    : ''
}
${chainLine(p.chain)}
<h2>Timeline</h2>
${p.summary ? html`<p class="muted">${summaryLine(p.summary)}</p>` : ''}
${p.total === 0 ? html`<p class="empty">The audit log holds no record of this task yet.</p>` : html`${nav}<ol class="timeline">${timelineItems(p)}</ol>${nav}`}`,
  );
}

function timelineItems(p: TimelinePage): Html[] {
  const out: Html[] = [];
  let group: Html[] | undefined;
  let groupHead: Html | undefined;
  let session: string | undefined;
  const close = () => {
    if (group && groupHead) out.push(html`<li class="kubectl"><details open><summary>${groupHead}</summary><ol>${group}</ol></details></li>`);
    group = undefined;
    groupHead = undefined;
  };
  for (const r of p.records) {
    const k = kubectlOf(r);
    if (!k || k.session !== session) {
      close();
      session = k?.session;
      if (k) {
        group = [];
        groupHead = html`<time>${recordTime(r).slice(11, 23)}</time> <code>$ ${visible(k.command)}</code>`;
      }
    }
    const item = timelineItem(p.id, r);
    if (group) group.push(item);
    else out.push(item);
  }
  close();
  return out;
}

function timelineItem(taskId: string, r: AuditRecord): Html {
  const cls = r.outcome === 'denied' ? 'denied' : r.outcome === 'error' ? 'error' : r.type === 'k8s.request' ? 'request' : 'event';
  const rec = recordingOf(r);
  // eventLine is the CLI's words for the record, its control characters already escaped (printable).
  return html`<li class="${cls}"><time datetime="${recordTime(r)}">${recordTime(r).slice(11, 23)}</time> <span class="what">${eventLine(r)}</span>${
    rec
      ? html`<div class="player" data-recording="/ui/tasks/${taskId}/recordings/${rec.file}"><div class="controls"><button type="button" class="play">Replay ${rec.kind} session</button> <label>Speed <select class="speed"><option value="1">1x</option><option value="4" selected>4x</option><option value="16">16x</option><option value="0">instant</option></select></label></div><pre class="term" tabindex="0" aria-label="${rec.kind} session: what was typed and what came back" aria-live="off"></pre></div>`
      : ''
  }</li>`;
}
