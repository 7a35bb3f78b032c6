/**
 * What a Kubernetes API request is, read from its method, path and query the way the API server reads
 * it (k8s.io/apiserver/pkg/endpoints/request/requestinfo.go, RequestInfoFactory.NewRequestInfo), so a
 * `k8s.request` record from the proxy names the same verb, resource and subresource as the webhook's
 * record of the same request would. Pure.
 *
 * And which paths the proxy forwards at all: plain segments of the characters Kubernetes names and
 * API paths use. A percent-encoded path, an empty, `.` or `..` segment, a backslash or a control
 * character is refused before anything is forwarded (the API server and any proxy between it and us
 * must never see a path the recording names differently).
 */

export interface RequestInfo {
  /** False for discovery, /version, /openapi, /healthz, ... */
  isResourceRequest: boolean;
  /** get, list, watch, create, update, patch, delete, deletecollection, proxy; or the lower-cased method of a non-resource request. */
  verb: string;
  apiGroup: string;
  apiVersion: string;
  resource: string;
  subresource: string;
  namespace: string;
  name: string;
  /** The path (no query), for non-resource requests and records. */
  path: string;
}

const API_PREFIXES = new Set(['api', 'apis']);
const GROUPLESS_PREFIXES = new Set(['api']);
const SPECIAL_VERBS = new Set(['proxy', 'watch']);
const NAMESPACE_SUBRESOURCES = new Set(['status', 'finalize']);
const METHOD_VERBS: Record<string, string> = { POST: 'create', GET: 'get', HEAD: 'get', PUT: 'update', PATCH: 'patch', DELETE: 'delete' };

/** Characters of a path segment the proxy forwards (RFC 3986 pchar without `%`). */
const SEGMENT = /^[A-Za-z0-9\-._~:@!$&'()*+,;=]+$/;

/** Why a request target is refused, or undefined when it may be forwarded. */
export function targetProblem(url: string): string | undefined {
  if (!url.startsWith('/')) return 'an absolute URI or a request target that is not a path';
  const q = url.indexOf('?');
  const path = q < 0 ? url : url.slice(0, q);
  const query = q < 0 ? '' : url.slice(q + 1);
  if (path.includes('%')) return 'a percent-encoded path';
  if (path === '/') return undefined;
  const segments = path.slice(1).split('/');
  // One trailing slash is allowed (`/api/`), no empty segment elsewhere.
  if (segments.at(-1) === '') segments.pop();
  for (const s of segments) {
    if (s === '' || s === '.' || s === '..') return 'a path with an empty, "." or ".." segment';
    if (!SEGMENT.test(s)) return 'a path with a character outside of Kubernetes paths';
  }
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u0020\u007f\\#]/.test(query)) return 'a query with a control character, space, backslash or #';
  return undefined;
}

/** The API server's reading of a request. `url` must have passed targetProblem(). */
export function requestInfo(method: string, url: string): RequestInfo {
  const q = url.indexOf('?');
  const path = q < 0 ? url : url.slice(0, q);
  const info: RequestInfo = { isResourceRequest: false, verb: method.toLowerCase(), apiGroup: '', apiVersion: '', resource: '', subresource: '', namespace: '', name: '', path };
  let parts = path.split('/').filter((p) => p !== '');
  if (parts.length < 3 || !API_PREFIXES.has(parts[0]!)) return info;
  const prefix = parts[0]!;
  parts = parts.slice(1);
  if (!GROUPLESS_PREFIXES.has(prefix)) {
    if (parts.length < 3) return info;
    info.apiGroup = parts[0]!;
    parts = parts.slice(1);
  }
  info.isResourceRequest = true;
  info.apiVersion = parts[0]!;
  parts = parts.slice(1);
  if (parts.length === 0) return { ...info, isResourceRequest: false, verb: method.toLowerCase() };
  if (SPECIAL_VERBS.has(parts[0]!)) {
    if (parts.length < 2) return { ...info, isResourceRequest: false, verb: method.toLowerCase() };
    info.verb = parts[0]!;
    parts = parts.slice(1);
  } else {
    info.verb = METHOD_VERBS[method.toUpperCase()] ?? '';
  }
  if (parts[0] === 'namespaces') {
    if (parts.length > 1) {
      info.namespace = parts[1]!;
      if (parts.length > 2 && !NAMESPACE_SUBRESOURCES.has(parts[2]!)) parts = parts.slice(2);
    }
  }
  if (parts.length >= 3 && info.verb !== 'proxy') info.subresource = parts[2]!;
  if (parts.length >= 2) info.name = parts[1]!;
  if (parts.length >= 1) info.resource = parts[0]!;
  if (info.name === '' && info.verb === 'get') {
    const query = new URLSearchParams(q < 0 ? '' : url.slice(q + 1));
    const watch = query.get('watch');
    info.verb = watch !== null && !['false', '0', 'f'].includes(watch.toLowerCase()) ? 'watch' : 'list';
    const byName = /^metadata\.name(==?)([^,]+)$/.exec(query.get('fieldSelector') ?? '');
    if (byName && SEGMENT.test(byName[2]!)) info.name = byName[2]!;
  }
  if (info.name === '' && info.verb === 'delete') info.verb = 'deletecollection';
  return info;
}

/** Whether the answer to this request is a stream that stays open (watch, `logs -f`). */
export function isStreaming(info: RequestInfo, url: string): boolean {
  if (info.verb === 'watch') return true;
  if (info.subresource === 'log') {
    const q = url.indexOf('?');
    const follow = new URLSearchParams(q < 0 ? '' : url.slice(q + 1)).get('follow');
    return follow !== null && ['true', '1', 't'].includes(follow.toLowerCase());
  }
  return false;
}
