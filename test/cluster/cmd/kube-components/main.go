// Command kube-components is a multi-call program holding the rest of the local control plane:
// the real kube-scheduler and kube-controller-manager (k8s.io/kubernetes cmd/kube-scheduler/app and
// cmd/kube-controller-manager/app, the same module and version as the API server), and `certs`,
// which makes the cluster's CA and the client and serving certificates of each component.
//
// Usage:
//
//	kube-components [--exit-with-stdin] scheduler [kube-scheduler flags...]
//	kube-components [--exit-with-stdin] controller-manager [kube-controller-manager flags...]
//	kube-components certs --dir DIR [--node-name NAME]
//
// When started with argv[0] "kube-scheduler" or "kube-controller-manager" (LocalCluster does so, so
// that ps shows what runs), that name chooses the component and no subcommand is given.
//
// One program rather than two: the two components share nearly all their packages, so one binary
// is one link (about 15 s on 2 cores) instead of two, and one ~100 MB file instead of two.
//
// With --exit-with-stdin the process exits when its standard input closes: when the test process
// that started it dies, even by SIGKILL.
package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	_ "time/tzdata" // the controller-manager's CronJob controller needs time zones

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func usage() {
	fmt.Fprintln(os.Stderr, "usage: kube-components [--exit-with-stdin] scheduler|controller-manager [flags...]\n       kube-components certs --dir DIR [--node-name NAME]")
	os.Exit(2)
}

func main() {
	args := os.Args[1:]
	exitWithStdin := false
	if len(args) > 0 && args[0] == "--exit-with-stdin" {
		exitWithStdin = true
		args = args[1:]
	}
	component := ""
	switch base := filepath.Base(os.Args[0]); base {
	case "kube-scheduler", "kube-controller-manager":
		component = base[len("kube-"):]
	default:
		if len(args) == 0 {
			usage()
		}
		component, args = args[0], args[1:]
	}
	if exitWithStdin {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			os.Exit(0)
		}()
	}
	switch component {
	case "scheduler":
		command := scheduler.NewSchedulerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "controller-manager":
		command := controllermanager.NewControllerManagerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "certs":
		os.Exit(certsMain(args))
	default:
		usage()
	}
}
