// Command kube-apiserver is the real Kubernetes API server (k8s.io/kubernetes/cmd/kube-apiserver/app)
// preceded by an embedded etcd on loopback, so that tests get a whole control plane from one process.
//
// Usage:
//
//	kube-apiserver --etcd-dir DIR [--exit-with-stdin] [--remove-on-exit DIR] -- [kube-apiserver flags...]
//
// The etcd listens on 127.0.0.1 on ports the kernel picks (so there is no race for a free port);
// --etcd-servers is appended to the API server's flags. Everything after "--" goes to the API server.
//
// With --exit-with-stdin the process exits when its standard input closes, which happens when the
// test process that started it dies, even by SIGKILL: a crashed test leaves no server behind.
// --remove-on-exit names a directory to remove at that moment (the cluster's temporary folder).
package main

import (
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"time"
	_ "time/tzdata" // the API server validates CronJob time zones

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap/zapcore"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	own := flag.NewFlagSet("kube-apiserver", flag.ExitOnError)
	etcdDir := own.String("etcd-dir", "", "directory for the embedded etcd's data (created with mode 0700)")
	exitWithStdin := own.Bool("exit-with-stdin", false, "exit when standard input reaches EOF (the parent died)")
	removeOnExit := own.String("remove-on-exit", "", "with --exit-with-stdin: a directory to remove before exiting")
	own.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: kube-apiserver --etcd-dir DIR -- [kube-apiserver flags...]")
		own.PrintDefaults()
	}
	_ = own.Parse(os.Args[1:])
	if *etcdDir == "" {
		own.Usage()
		os.Exit(2)
	}

	if *exitWithStdin {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			if *removeOnExit != "" {
				removeSettled(*removeOnExit)
			}
			os.Exit(0)
		}()
	}

	clientURL, err := startEtcd(*etcdDir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "could not start the embedded etcd: %v\n", err)
		os.Exit(1)
	}

	command := app.NewAPIServerCommand()
	command.SetArgs(append(own.Args(), "--etcd-servers="+clientURL))
	os.Exit(cli.Run(command))
}

// startEtcd starts a single-member etcd on loopback and returns its client URL.
func startEtcd(dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("could not create %s: %w", dir, err)
	}
	loopback := url.URL{Scheme: "http", Host: "127.0.0.1:0"}

	cfg := embed.NewConfig()
	cfg.Name = "local"
	cfg.Dir = dir
	cfg.ListenClientUrls = []url.URL{loopback}
	cfg.AdvertiseClientUrls = []url.URL{loopback}
	cfg.ListenPeerUrls = []url.URL{loopback}
	cfg.AdvertisePeerUrls = []url.URL{loopback}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.UnsafeNoFsync = true // test data: speed over durability
	cfg.LogLevel = zapcore.ErrorLevel.String()
	cfg.ListenMetricsUrls = nil

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return "", err
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		return "", err
	case <-time.After(60 * time.Second):
		e.Close()
		return "", fmt.Errorf("etcd was not ready within 60s")
	}
	go func() {
		if err, ok := <-e.Err(); ok && err != nil {
			fmt.Fprintf(os.Stderr, "embedded etcd failed: %v\n", err)
			os.Exit(1)
		}
	}()
	// The kernel chose the port; read it back from the listener.
	return "http://" + e.Clients[0].Addr().String(), nil
}

// removeSettled removes dir, again and again while something still writes into it (the node, dying
// with the same parent, may write its process-groups file while RemoveAll walks the tree, which then
// cannot remove the directory), until it has stayed gone for 200 ms or 3 s have passed.
func removeSettled(dir string) {
	gone := 0
	for i := 0; i < 30; i++ {
		_ = os.RemoveAll(dir)
		if _, err := os.Stat(dir); os.IsNotExist(err) {
			if gone++; gone == 2 {
				return
			}
		} else {
			gone = 0
		}
		time.Sleep(100 * time.Millisecond)
	}
}
