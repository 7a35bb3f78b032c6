package main

import (
	"bufio"
	"errors"
	"io"
	"strings"
	"testing"
)

// The hand-written HTTP/1.1 reader (post, readResponse): what the Node build's parseResponse is
// tested for in test/unit/credential-plugin.test.ts, and the cases net/http used to handle for it.
func TestReadResponse(t *testing.T) {
	read := func(raw string) (int, string, error) {
		status, body, err := readResponse(bufio.NewReader(strings.NewReader(raw)))
		return status, string(body), err
	}
	for _, c := range []struct {
		name, raw, body string
		status          int
		err             error
	}{
		{"content-length", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}trailing", "{}", 200, nil},
		{"chunked", "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;ext=1\r\n\":1}\r\n0\r\n\r\n", `{"a":1}`, 404, nil},
		{"to the end", "HTTP/1.0 502 Bad Gateway\r\n\r\n<html>", "<html>", 502, nil},
		{"interim answer skipped", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", "x", 200, nil},
		{"redirect, body unread", "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://elsewhere\r\nContent-Length: 10\r\n\r\n", "", 307, nil},
		{"truncated body", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "{}", 200, io.ErrUnexpectedEOF},
		{"truncated chunk", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{}", "{}", 200, io.ErrUnexpectedEOF},
		{"no status line", "SSH-2.0-OpenSSH\r\n\r\n", "", 0, errMalformed},
		{"truncated head", "HTTP/1.1 200 OK\r\nContent-Le", "", 0, io.EOF},
	} {
		status, body, err := read(c.raw)
		if status != c.status || body != c.body || !errors.Is(err, c.err) {
			t.Errorf("%s: got %d %q %v, want %d %q %v", c.name, status, body, err, c.status, c.body, c.err)
		}
	}
	// At most 1 MiB of body is kept.
	_, body, err := read("HTTP/1.1 200 OK\r\n\r\n" + strings.Repeat("x", maxBodyBytes+10))
	if len(body) != maxBodyBytes || err != nil {
		t.Errorf("long body: %d bytes, %v", len(body), err)
	}
}
