package main

// Container logs. Each run of a container writes one file of records, one a line:
//
//	TIMESTAMP STREAM F|P CONTENT
//
// (RFC 3339 with nanoseconds, stdout or stderr, F for a full line and P for a partial one: output
// not ended by a newline yet, written as soon as it is read so that `logs -f` and attach see it
// at once). The same layout as the CRI's log files.

import (
	"bufio"
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/node/api"
)

type logWriter struct {
	mu sync.Mutex
	f  *os.File
}

func newLogWriter(path string) (*logWriter, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	return &logWriter{f: f}, nil
}

func (w *logWriter) write(stream string, data []byte) {
	ts := time.Now().UTC().Format(time.RFC3339Nano)
	var b strings.Builder
	for len(data) > 0 {
		line, rest, full := strings.Cut(string(data), "\n")
		flag := "P"
		if full {
			flag = "F"
		}
		b.WriteString(ts + " " + stream + " " + flag + " " + line + "\n")
		data = []byte(rest)
		if !full {
			break
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	_, _ = w.f.WriteString(b.String())
}

func (w *logWriter) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	_ = w.f.Close()
}

type logRecord struct {
	ts      time.Time
	raw     string // the timestamp as written
	full    bool
	content string
}

func parseRecord(line string) (logRecord, bool) {
	line = strings.TrimSuffix(line, "\n")
	ts, rest, ok1 := strings.Cut(line, " ")
	_, rest, ok2 := strings.Cut(rest, " ")
	flag, content, ok3 := strings.Cut(rest, " ")
	if !ok1 || !ok2 || !ok3 {
		return logRecord{}, false
	}
	t, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		return logRecord{}, false
	}
	return logRecord{ts: t, raw: ts, full: flag == "F", content: content}, true
}

var errLimit = errors.New("limit reached")

type limitWriter struct {
	w    io.Writer
	left int
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if l.left <= 0 {
		return 0, errLimit
	}
	if len(p) > l.left {
		n, err := l.w.Write(p[:l.left])
		l.left -= n
		if err == nil {
			err = errLimit
		}
		return n, err
	}
	n, err := l.w.Write(p)
	l.left -= n
	return n, err
}

// streamLog returns a container run's log as kubectl expects it. With Follow it goes on until the
// run has ended (done is closed) and everything is read, or until the request ends.
func streamLog(ctx context.Context, file string, done <-chan struct{}, opts api.ContainerLogOpts) io.ReadCloser {
	pr, pw := io.Pipe()
	go func() {
		var out io.Writer = pw
		if opts.LimitBytes > 0 {
			out = &limitWriter{w: pw, left: opts.LimitBytes}
		}
		var since time.Time
		if !opts.SinceTime.IsZero() {
			since = opts.SinceTime
		} else if opts.SinceSeconds > 0 {
			since = time.Now().Add(-time.Duration(opts.SinceSeconds) * time.Second)
		}
		emit := func(r logRecord) error {
			if !since.IsZero() && r.ts.Before(since) {
				return nil
			}
			s := r.content
			if r.full {
				s += "\n"
			}
			if opts.Timestamps {
				s = r.raw + " " + s
			}
			_, err := io.WriteString(out, s)
			return err
		}
		f, err := os.Open(file)
		if err != nil {
			_ = pw.CloseWithError(err)
			return
		}
		defer f.Close()
		reader := bufio.NewReader(f)
		pending := ""
		// readAvailable returns the complete records readable now.
		readAvailable := func() []logRecord {
			var recs []logRecord
			for {
				line, err := reader.ReadString('\n')
				if err != nil {
					pending += line
					return recs
				}
				line, pending = pending+line, ""
				if r, ok := parseRecord(line); ok {
					recs = append(recs, r)
				}
			}
		}
		recs := readAvailable()
		if opts.Tail > 0 {
			start, lines := len(recs), 0
			for j := len(recs) - 1; j >= 0; j-- {
				if recs[j].full {
					if lines == opts.Tail {
						break
					}
					lines++
				}
				start = j
			}
			recs = recs[start:]
		}
		for {
			for _, r := range recs {
				if err := emit(r); err != nil {
					_ = pw.CloseWithError(nil)
					return
				}
			}
			if !opts.Follow {
				break
			}
			select {
			case <-ctx.Done():
				_ = pw.Close()
				return
			case <-done:
				// The run has ended: what is in the file now is all there will be.
				for _, r := range readAvailable() {
					if emit(r) != nil {
						break
					}
				}
				_ = pw.Close()
				return
			case <-time.After(100 * time.Millisecond):
			}
			recs = readAvailable()
		}
		_ = pw.Close()
	}()
	return pr
}

// fanout copies a running process's output to everyone attached to it.
type fanout struct {
	mu   sync.Mutex
	next int
	subs map[int][2]io.Writer
}

func newFanout() *fanout { return &fanout{subs: map[int][2]io.Writer{}} }

func (f *fanout) subscribe(stdout, stderr io.Writer) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.next++
	f.subs[f.next] = [2]io.Writer{stdout, stderr}
	return f.next
}

func (f *fanout) unsubscribe(id int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.subs, id)
}

func (f *fanout) write(stream string, data []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := 0
	if stream == "stderr" {
		i = 1
	}
	for id, s := range f.subs {
		if w := s[i]; w != nil {
			if _, err := w.Write(data); err != nil {
				delete(f.subs, id)
			}
		}
	}
}
