// Command broker-credential is the native build of `broker credential`, the client-go exec credential
// plugin. kubectl runs the plugin before every request of every invocation, and a Node.js process
// cannot start in less than ~25 ms; this one starts in a few. It behaves exactly as the Node plugin
// (src/credential/main.cts): same flags, environment, messages and exit codes, checked by the same
// tests. Standard library only.
//
// A failed run is run again: client-go keeps only a credential, never a failure, and kubectl's
// discovery asks for one before each of its steps (five runs for one refused `kubectl get` without a
// discovery cache). So a run that finds its parent has already waited for a child prints only the
// first line of its message (see ranBefore).
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
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

const usage = `usage: broker credential --task NAME [--broker URL] [--broker-ca FILE]

The kubectl exec credential plugin: prints an ExecCredential for the task NAME.
Broker URL and CA also come from BROKER_URL and BROKER_CA; the caller's identity from
BROKER_IDENTITY_TOKEN_FILE (e.g. a projected ServiceAccount token) or BROKER_IDENTITY_TOKEN.
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
	timeoutSeconds         int
	help                   bool
}

func parseArgs(argv []string) (options, error) {
	o := options{broker: os.Getenv("BROKER_URL"), brokerFrom: "BROKER_URL", brokerCA: os.Getenv("BROKER_CA")}
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
	return "", "", fail(exitUnauthenticated, "no identity: set BROKER_IDENTITY_TOKEN_FILE (e.g. a projected ServiceAccount token) or BROKER_IDENTITY_TOKEN")
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
		token, source, err := identity()
		if err != nil {
			return err
		}
		target, parseErr := url.Parse(o.broker + "/v1/tasks/" + url.PathEscape(o.task) + "/credential")
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
		// One deadline for the whole request, body included: the context ends DNS, dial and TLS, the
		// connection's deadline every read and write after.
		deadline := time.Now().Add(time.Duration(o.timeoutSeconds) * time.Second)
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		defer cancel()
		timedOut := func() error {
			return fail(exitUnavailable, "broker credential: the broker at %s gave no complete answer: timed out after %d s", o.broker, o.timeoutSeconds)
		}
		status, body, reqErr := post(ctx, deadline, target, token, tlsConfig)
		if reqErr != nil && status == 0 {
			if ctx.Err() != nil || errors.Is(reqErr, os.ErrDeadlineExceeded) {
				return timedOut()
			}
			return fail(exitUnavailable, "broker credential: the broker is unreachable at %s: %s", o.broker, networkError(&url.Error{Op: "Post", URL: target.String(), Err: reqErr}))
		}
		// Never follow a redirect: the identity token goes to the configured broker URL and nowhere else.
		if status >= 300 && status < 400 {
			return redirected(status, o)
		}
		if reqErr != nil && (ctx.Err() != nil || errors.Is(reqErr, os.ErrDeadlineExceeded)) {
			return timedOut()
		}
		if status != 200 {
			return explain(status, body, o, source)
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

// post makes the one request: a POST with no body on a fresh connection, written by hand on net (and
// crypto/tls for https://), as the Node build does on node:net. Not net/http: it is half of this
// binary and most of its start-up (docs/benchmarks.md, "Exec plugin"), for one HTTP/1.1 exchange
// with `Connection: close`. No proxy, no redirect followed (a 3xx is returned as it is). The status is
// 0 when no answer head arrived; otherwise the error, if any, is that of reading the body (whose
// part read so far is returned), at most 1 MiB of it.
func post(ctx context.Context, deadline time.Time, target *url.URL, token string, tlsConfig *tls.Config) (int, []byte, error) {
	host, port := target.Hostname(), target.Port()
	if port == "" {
		port = "80"
		if target.Scheme == "https" {
			port = "443"
		}
	}
	conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", net.JoinHostPort(host, port))
	if err != nil {
		return 0, nil, err
	}
	defer conn.Close()
	if err := conn.SetDeadline(deadline); err != nil {
		return 0, nil, err
	}
	if target.Scheme == "https" {
		config := tlsConfig.Clone()
		config.ServerName = host
		config.NextProtos = []string{"http/1.1"}
		secure := tls.Client(conn, config)
		if err := secure.HandshakeContext(ctx); err != nil {
			return 0, nil, err
		}
		conn = secure
	}
	request := "POST " + target.RequestURI() + " HTTP/1.1\r\nHost: " + target.Host + "\r\nAuthorization: Bearer " + token +
		"\r\nAccept: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
	if _, err := io.WriteString(conn, request); err != nil {
		return 0, nil, err
	}
	return readResponse(bufio.NewReader(conn))
}

const (
	maxBodyBytes = 1 << 20
	maxHeadBytes = 1 << 20
)

var errMalformed = errors.New("malformed HTTP response")

// readResponse reads an HTTP/1.x answer: its status, then its body by Content-Length, chunked, or to
// the end of the stream. Interim 1xx answers are skipped.
func readResponse(r *bufio.Reader) (int, []byte, error) {
	headBytes := 0
	line := func() (string, error) {
		text, err := r.ReadSlice('\n')
		headBytes += len(text)
		if err == bufio.ErrBufferFull || headBytes > maxHeadBytes {
			return "", errMalformed
		}
		if err != nil {
			return "", err
		}
		return strings.TrimRight(string(text), "\r\n"), nil
	}
	for {
		first, err := line()
		if err != nil {
			return 0, nil, err
		}
		if len(first) < 12 || !strings.HasPrefix(first, "HTTP/1.") || first[8] != ' ' || (len(first) > 12 && first[12] != ' ') {
			return 0, nil, errMalformed
		}
		status, convErr := strconv.Atoi(first[9:12])
		if convErr != nil || status < 100 {
			return 0, nil, errMalformed
		}
		length, chunked := int64(-1), false
		for {
			header, err := line()
			if err != nil {
				return 0, nil, err
			}
			if header == "" {
				break
			}
			name, value, ok := strings.Cut(header, ":")
			if !ok {
				return 0, nil, errMalformed
			}
			value = strings.TrimSpace(value)
			switch strings.ToLower(strings.TrimSpace(name)) {
			case "content-length":
				n, err := strconv.ParseInt(value, 10, 64)
				if err != nil || n < 0 {
					return 0, nil, errMalformed
				}
				length = n
			case "transfer-encoding":
				chunked = strings.EqualFold(value, "chunked")
			}
		}
		if status < 200 {
			continue // 100 Continue and the like: the answer follows
		}
		if status >= 300 && status < 400 {
			return status, nil, nil // refused unread (a redirect's body is of no use, and may never end)
		}
		var body io.Reader = r
		switch {
		case chunked:
			body = &chunkedReader{r: r}
		case length >= 0:
			body = io.LimitReader(r, length)
		}
		data, err := io.ReadAll(io.LimitReader(body, maxBodyBytes))
		if err == nil && length > 0 && !chunked && int64(len(data)) < min(length, maxBodyBytes) {
			err = io.ErrUnexpectedEOF
		}
		return status, data, err
	}
}

// chunkedReader decodes a chunked body (RFC 9112, 7.1), trailers ignored.
type chunkedReader struct {
	r    *bufio.Reader
	left int64
	done bool
}

func (c *chunkedReader) Read(p []byte) (int, error) {
	if c.done {
		return 0, io.EOF
	}
	if c.left == 0 {
		size, err := c.r.ReadSlice('\n')
		if err != nil {
			return 0, unexpected(err)
		}
		text, _, _ := strings.Cut(strings.TrimRight(string(size), "\r\n"), ";")
		n, convErr := strconv.ParseInt(strings.TrimSpace(text), 16, 64)
		if convErr != nil || n < 0 {
			return 0, errMalformed
		}
		if n == 0 {
			c.done = true
			return 0, io.EOF
		}
		c.left = n
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= int64(n)
	if c.left == 0 && err == nil {
		if _, err = c.r.Discard(2); err != nil { // the CRLF after the chunk's data
			return n, unexpected(err)
		}
	}
	return n, unexpected(err)
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr, os.Getppid()))
}
