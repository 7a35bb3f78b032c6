// Command broker-credential is the native build of `broker credential`, the client-go exec credential
// plugin. kubectl runs the plugin before every request of every invocation, and a Node.js process
// cannot start in less than ~25 ms; this one starts in a few. It behaves exactly as the Node plugin
// (src/credential/main.cts): same flags, environment, messages and exit codes, checked by the same
// tests. Standard library only, but for godbus (the OS keychain, read only when the environment names
// no identity: identity.go).
//
// A failed run is run again: client-go keeps only a credential, never a failure, and kubectl's
// discovery asks for one before each of its steps (five runs for one refused `kubectl get` without a
// discovery cache). So a run that finds its parent has already waited for a child prints only the
// first line of its message (see ranBefore).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
)

const (
	exitOK              = 0
	exitError           = 1
	exitUsage           = 2
	exitApproval        = 3
	exitUnauthenticated = 4
	exitUnavailable     = 5
	// The whole request (DNS, connect, TLS, sending, headers, body) ends within this many seconds;
	// BROKER_CREDENTIAL_TIMEOUT sets it. An idle timeout alone lets a server that drips bytes hold kubectl.
	defaultTimeoutSeconds = 10
	maxTimeoutSeconds     = 300
)

var apiVersions = []string{"client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"}

const usage = `usage: broker credential --task NAME [--broker URL] [--broker-ca FILE] [--via direct|proxy]

The kubectl exec credential plugin: prints an ExecCredential for the task NAME.
--via proxy asks for a session token for the broker's Kubernetes API proxy (the task's own
token then stays in the broker); --via direct (the default) for the task's token itself.
Broker URL and CA also come from BROKER_URL and BROKER_CA; the caller's identity from
BROKER_IDENTITY_TOKEN_FILE (e.g. a projected ServiceAccount token) or BROKER_IDENTITY_TOKEN,
else BROKER_AGENT_KEY, else the OS keychain (broker agent enroll, broker login).
The broker URL must be https:// (http:// only to loopback); redirects are refused. The whole
request must end within BROKER_CREDENTIAL_TIMEOUT seconds (default 10).

Example:
  broker credential --task deploy --broker https://broker.example:8443

kubectl runs it from a kubeconfig user (` + "`broker kubeconfig`" + ` writes one):
  exec:
    apiVersion: client.authentication.k8s.io/v1
    command: broker
    args: [credential, --task, deploy]
    interactiveMode: Never
`

type pluginError struct {
	message string
	code    int
}

func (e *pluginError) Error() string { return e.message }

func fail(code int, format string, args ...any) *pluginError {
	return &pluginError{message: fmt.Sprintf(format, args...), code: code}
}

type options struct {
	task, broker, brokerCA string
	brokerFrom             string // where the broker URL came from, for messages: --broker or BROKER_URL
	via                    string // "proxy": a session token for the broker's proxy; "direct": the task's token
	timeoutSeconds         int
	help                   bool
}

func parseArgs(argv []string) (options, error) {
	o := options{broker: os.Getenv("BROKER_URL"), brokerFrom: "BROKER_URL", brokerCA: os.Getenv("BROKER_CA"), via: "direct"}
	for i := 0; i < len(argv); i++ {
		arg := argv[i]
		flag, inline, hasInline := arg, "", false
		if strings.HasPrefix(arg, "--") {
			if eq := strings.Index(arg, "="); eq > 0 {
				flag, inline, hasInline = arg[:eq], arg[eq+1:], true
			}
		}
		value := func() (string, error) {
			v := inline
			if !hasInline {
				if i+1 >= len(argv) {
					return "", fail(exitUsage, "%s needs a value\n%s", flag, usage)
				}
				i++
				v = argv[i]
			}
			if v == "" {
				return "", fail(exitUsage, "%s needs a value\n%s", flag, usage)
			}
			return v, nil
		}
		var err error
		switch flag {
		case "--task":
			o.task, err = value()
		case "--broker":
			o.broker, err = value()
			o.brokerFrom = "--broker"
		case "--broker-ca":
			o.brokerCA, err = value()
		case "--via":
			o.via, err = value()
			if err == nil && o.via != "direct" && o.via != "proxy" {
				quoted, _ := json.Marshal(o.via)
				err = fail(exitUsage, "--via must be direct or proxy, not %s\n%s", quoted, usage)
			}
		case "-h", "--help":
			o.help = true
			return o, nil
		default:
			quoted, _ := json.Marshal(arg)
			return o, fail(exitUsage, "unknown argument %s\n%s", quoted, usage)
		}
		if err != nil {
			return o, err
		}
	}
	if o.task == "" {
		return o, fail(exitUsage, "--task is required\n%s", usage)
	}
	if o.broker == "" {
		return o, fail(exitUsage, "no broker: pass --broker URL or set BROKER_URL")
	}
	o.broker = strings.TrimRight(o.broker, "/")
	o.timeoutSeconds = defaultTimeoutSeconds
	if raw := os.Getenv("BROKER_CREDENTIAL_TIMEOUT"); raw != "" {
		n, convErr := strconv.Atoi(raw)
		if convErr != nil || strings.TrimLeft(raw, "0123456789") != "" || raw[0] == '0' || n < 1 || n > maxTimeoutSeconds {
			quoted, _ := json.Marshal(raw)
			return o, fail(exitUsage, "BROKER_CREDENTIAL_TIMEOUT must be a whole number of seconds from 1 to %d, not %s", maxTimeoutSeconds, quoted)
		}
		o.timeoutSeconds = n
	}
	return o, nil
}

// loopback: the only hosts plain http:// may reach (127.0.0.0/8, ::1, localhost); the identity token
// must not cross a network in clear.
func loopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return false
	}
	return (addr.Is4() && addr.As4()[0] == 127) || addr == netip.IPv6Loopback()
}

func execAPIVersion() (string, error) {
	raw := os.Getenv("KUBERNETES_EXEC_INFO")
	if raw == "" {
		return apiVersions[0], nil
	}
	var info struct {
		APIVersion any `json:"apiVersion"`
	}
	if err := json.Unmarshal([]byte(raw), &info); err != nil {
		return "", fail(exitError, "KUBERNETES_EXEC_INFO is not valid JSON")
	}
	if v, ok := info.APIVersion.(string); ok {
		for _, known := range apiVersions {
			if v == known {
				return v, nil
			}
		}
	}
	asked, _ := json.Marshal(info.APIVersion)
	if info.APIVersion == nil {
		asked = []byte("undefined")
	}
	return "", fail(exitError, "KUBERNETES_EXEC_INFO asks for apiVersion %s; this plugin answers only %s", asked, strings.Join(apiVersions, " or "))
}

func identity() (token, source string, err error) {
	if file := os.Getenv("BROKER_IDENTITY_TOKEN_FILE"); file != "" {
		data, readErr := os.ReadFile(file)
		if readErr != nil {
			return "", "", fail(exitUnauthenticated, "cannot read the identity token BROKER_IDENTITY_TOKEN_FILE=%s: %s", file, errnoName(readErr))
		}
		token = strings.TrimSpace(string(data))
		if token == "" {
			return "", "", fail(exitUnauthenticated, "the identity token file BROKER_IDENTITY_TOKEN_FILE=%s is empty", file)
		}
		return checked(token, "BROKER_IDENTITY_TOKEN_FILE="+file)
	}
	if token = strings.TrimSpace(os.Getenv("BROKER_IDENTITY_TOKEN")); token != "" {
		return checked(token, "BROKER_IDENTITY_TOKEN")
	}
	return "", "", fail(exitUnauthenticated, "no identity: set BROKER_IDENTITY_TOKEN_FILE (e.g. a projected ServiceAccount token) or BROKER_IDENTITY_TOKEN, or BROKER_AGENT_KEY; or keep an agent key or a login in the OS keychain (broker agent enroll, broker login)")
}

// A bearer token is printable ASCII without spaces; anything else could inject into the request.
func checked(token, source string) (string, string, error) {
	for _, c := range token {
		if c < 0x21 || c > 0x7e {
			return "", "", fail(exitUnauthenticated, "the identity token from %s contains characters a token cannot have", source)
		}
	}
	return token, source, nil
}

// errnoName gives the errno name Node prints (ENOENT, ECONNREFUSED, ...), so messages match.
func errnoName(err error) string {
	text := err.Error()
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "ENOENT"
	case errors.Is(err, os.ErrPermission):
		return "EACCES"
	case strings.Contains(text, "connection refused"):
		return "ECONNREFUSED"
	case strings.Contains(text, "no such host"):
		return "ENOTFOUND"
	case strings.Contains(text, "is a directory"):
		return "EISDIR"
	}
	return text
}

type brokerError struct {
	Code      string `json:"code"`
	Message   string `json:"message"`
	RequestID string `json:"requestId"`
}

// namesCommand: whether a broker's message already tells the user which `broker` command to run.
func namesCommand(message string) bool {
	// Go's regexp has no lookaround: the boundaries are matched as characters, or the ends.
	return regexp.MustCompile(`(^|[^\w-])broker (task|run|templates|approve|approvals|whoami|kubeconfig|login)([^\w-]|$)`).MatchString(message)
}

// ranBefore: whether the process that runs this one has already waited for a child. kubectl runs no
// other child, so then this is not its first run of the plugin. A failed run is not cached by
// client-go (plugin/pkg/client/auth/exec/exec.go keeps only a credential), and kubectl's discovery
// (discovery/cached/memory/memcache.go) keeps no failure either, so each discovery step of one kubectl
// command runs the plugin again. Read from the parent's cminflt in /proc/PPID/stat (the minor faults
// of the children it has waited for: 0 until it has waited for one, never 0 after), in memory, with
// nothing written anywhere. Linux only: elsewhere, or when it cannot be read, false.
func ranBefore(ppid int) bool {
	if ppid <= 1 {
		return false
	}
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(ppid) + "/stat")
	if err != nil {
		return false
	}
	// pid (comm) state ppid pgrp session tty_nr tpgid flags minflt cminflt ...; comm may hold spaces.
	text := string(stat)
	end := strings.LastIndexByte(text, ')')
	if end < 0 || end+2 > len(text) {
		return false
	}
	fields := strings.Split(text[end+2:], " ")
	if len(fields) < 9 {
		return false
	}
	n, convErr := strconv.ParseUint(fields[8], 10, 64)
	return convErr == nil && n > 0
}

func explain(status int, body []byte, o options, source string) *pluginError {
	var parsed struct {
		Error *brokerError `json:"error"`
	}
	e := brokerError{}
	if json.Unmarshal(body, &parsed) == nil && parsed.Error != nil {
		e = *parsed.Error
	}
	said := ""
	if e.Message != "" {
		said = ": " + e.Message
	}
	switch e.Code {
	case "no_active_task":
		// The broker's message names the command that starts the task when it knows the template and
		// namespace (from the task's history); the placeholders are only for a broker that does not.
		msg := e.Message
		if msg == "" {
			msg = fmt.Sprintf("no active task %q", o.task)
		}
		if namesCommand(msg) {
			return fail(exitError, "broker credential: %s", msg)
		}
		return fail(exitError, "broker credential: %s\nstart one with: broker task start TEMPLATE --namespace NAMESPACE --name %s", msg, o.task)
	case "unauthenticated":
		return fail(exitUnauthenticated, "broker credential: the broker did not accept the identity from %s (missing, expired, or not an agent in the policy)", source)
	case "forbidden":
		return fail(exitError, "broker credential: refused%s", said)
	case "approval_required":
		request, id := "", "REQUEST_ID"
		if e.RequestID != "" {
			request, id = fmt.Sprintf(" (request %s)", e.RequestID), e.RequestID
		}
		if namesCommand(e.Message) {
			return fail(exitApproval, "broker credential: task %q needs approval%s%s", o.task, request, said)
		}
		return fail(exitApproval, "broker credential: task %q needs approval%s%s\nask an approver to run: broker approve %s", o.task, request, said, id)
	case "audit_unavailable", "cluster_unavailable", "rate_limited":
		return fail(exitUnavailable, "broker credential: the broker at %s cannot serve credentials now%s [%s]", o.broker, said, e.Code)
	}
	code := ""
	if e.Code != "" {
		code = " [" + e.Code + "]"
	}
	return fail(exitError, "broker credential: the broker at %s answered %d%s%s", o.broker, status, said, code)
}

// redirected refuses a 3xx answer. Its Location is not printed: it may carry a token of its own.
func redirected(status int, o options) *pluginError {
	return fail(exitError, "broker credential: the broker at %s answered %d, a redirect: redirects are refused, the identity token goes only to the configured broker URL (check %s)", o.broker, status, o.brokerFrom)
}

// run is the plugin; ppid is the process that runs it (kubectl), see ranBefore.
func run(argv []string, stdout, stderr io.Writer, ppid int) int {
	err := func() error {
		o, err := parseArgs(argv)
		if err != nil {
			return err
		}
		if o.help {
			fmt.Fprint(stdout, usage)
			return nil
		}
		apiVersion, err := execAPIVersion()
		if err != nil {
			return err
		}
		id, err := callerIdentity(o.broker)
		if err != nil {
			return err
		}
		query := ""
		if o.via == "proxy" {
			query = "?via=proxy"
		}
		target, parseErr := url.Parse(o.broker + "/v1/tasks/" + url.PathEscape(o.task) + "/credential" + query)
		if parseErr != nil || (target.Scheme != "http" && target.Scheme != "https") || target.Host == "" {
			quoted, _ := json.Marshal(o.broker)
			return fail(exitUsage, "the broker URL %s is not a URL", quoted)
		}
		if target.Scheme == "http" && !loopback(target.Hostname()) {
			return fail(exitUsage, "broker credential: the broker URL from %s is plain http:// to %s, which is not loopback: use https:// (http:// is allowed only to 127.0.0.0/8, ::1 and localhost, so that the identity token never crosses a network in clear)", o.brokerFrom, strings.ToLower(target.Host))
		}
		tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12}
		if o.brokerCA != "" {
			pem, readErr := os.ReadFile(o.brokerCA)
			if readErr != nil {
				return fail(exitUsage, "cannot read the broker CA %s: %s", o.brokerCA, errnoName(readErr))
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return fail(exitUsage, "the broker CA %s holds no PEM certificate", o.brokerCA)
			}
			tlsConfig.RootCAs = pool
		}
		// One deadline for the whole request, body included: the context ends DNS, dial, TLS and reads.
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(o.timeoutSeconds)*time.Second)
		defer cancel()
		timedOut := func() error {
			return fail(exitUnavailable, "broker credential: the broker at %s gave no complete answer: timed out after %d s", o.broker, o.timeoutSeconds)
		}
		client := &http.Client{
			Transport: &http.Transport{TLSClientConfig: tlsConfig, DialContext: (&net.Dialer{}).DialContext, Proxy: nil},
			// Never follow a redirect: the identity token goes to the configured broker URL and nowhere else.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
		authorization, err := id.authorization(http.MethodPost, target.String()) // an agent proof is for this method and URL only
		if err != nil {
			return err
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, target.String(), nil)
		req.Header.Set("Authorization", authorization)
		req.Header.Set("Accept", "application/json")
		res, reqErr := client.Do(req)
		if reqErr != nil {
			if ctx.Err() != nil {
				return timedOut()
			}
			return fail(exitUnavailable, "broker credential: the broker is unreachable at %s: %s", o.broker, networkError(reqErr))
		}
		defer res.Body.Close()
		if res.StatusCode >= 300 && res.StatusCode < 400 {
			return redirected(res.StatusCode, o)
		}
		body, readErr := io.ReadAll(io.LimitReader(res.Body, 1<<20))
		if readErr != nil && ctx.Err() != nil {
			return timedOut()
		}
		if res.StatusCode != http.StatusOK {
			return explain(res.StatusCode, body, o, id.source)
		}
		var credential struct {
			Token               *string `json:"token"`
			ExpirationTimestamp *string `json:"expirationTimestamp"`
		}
		if json.Unmarshal(body, &credential) != nil || credential.Token == nil || credential.ExpirationTimestamp == nil {
			return fail(exitError, "broker credential: the broker at %s answered 200 without a credential", o.broker)
		}
		out, _ := json.Marshal(struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Status     struct {
				Token               string `json:"token"`
				ExpirationTimestamp string `json:"expirationTimestamp"`
			} `json:"status"`
		}{APIVersion: apiVersion, Kind: "ExecCredential", Status: struct {
			Token               string `json:"token"`
			ExpirationTimestamp string `json:"expirationTimestamp"`
		}{*credential.Token, *credential.ExpirationTimestamp}})
		fmt.Fprintf(stdout, "%s\n", out)
		return nil
	}()
	if err == nil {
		return exitOK
	}
	var pe *pluginError
	if errors.As(err, &pe) {
		msg := pe.message
		// Run again by the same kubectl: one line (the first) is enough, the rest was printed the first time.
		if ranBefore(ppid) {
			msg, _, _ = strings.Cut(msg, "\n")
		}
		if !strings.HasSuffix(msg, "\n") {
			msg += "\n"
		}
		fmt.Fprint(stderr, msg)
		return pe.code
	}
	fmt.Fprintf(stderr, "broker credential: unexpected failure: %v\n", err)
	return exitError
}

// networkError names a failed request as Node would: an errno, or the TLS verification failure.
func networkError(err error) string {
	var unknownCA x509.UnknownAuthorityError
	var hostname x509.HostnameError
	switch {
	case errors.As(err, &unknownCA):
		return "SELF_SIGNED_CERT_IN_CHAIN (certificate signed by unknown authority; pass --broker-ca)"
	case errors.As(err, &hostname):
		return "ERR_TLS_CERT_ALTNAME_INVALID (" + hostname.Error() + ")"
	}
	return errnoName(err)
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr, os.Getppid()))
}
