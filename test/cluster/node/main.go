// Command local-node is the node of the local cluster: a kubelet stand-in built on virtual-kubelet's
// node library (github.com/virtual-kubelet/virtual-kubelet/node and node/api) whose provider runs
// each container as a local process (see provider.go).
//
// Usage:
//
//	local-node --kubeconfig FILE --dir DIR --tls-cert FILE --tls-key FILE --client-ca FILE
//	           [--name local-node] [--exit-with-stdin]
//
// It registers the Node (Ready at once), renews its Lease in kube-node-lease, runs the pods bound to
// it, and serves the kubelet API (logs, exec, attach, port-forward) over TLS on a loopback port the
// kernel picks, published in the Node's status (daemonEndpoints). Only clients with a certificate
// from --client-ca whose common name is kube-apiserver-kubelet-client (the API server) get in.
//
// nodeutil is not used: its NewNode brings the whole generic API server (webhook authentication)
// into the build, twice the packages; the same wiring is done here in a few lines.
//
// No process outlives the node: each container and exec runs in its own process group (and dies
// with the node's thread by PR_SET_PDEATHSIG); on SIGTERM, SIGINT or, with --exit-with-stdin, the
// end of its standard input, the node kills every group it started, then exits. The groups alive at
// any moment are listed in DIR/process-groups, so whoever SIGKILLs the node can finish the job.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/virtual-kubelet/virtual-kubelet/log"
	logruslogger "github.com/virtual-kubelet/virtual-kubelet/log/logrus"
	"github.com/virtual-kubelet/virtual-kubelet/node"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
)

// The common name of the only client let in: the API server (--kubelet-client-certificate).
const apiServerClientCN = "kube-apiserver-kubelet-client"

// KubeletVersion is what the Node reports; set with -ldflags "-X main.KubeletVersion=...".
var KubeletVersion = "v0.0.0"

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig with the node's client certificate")
	name := flag.String("name", "local-node", "the Node's name")
	dir := flag.String("dir", "", "the node's directory: pods, their working directories and logs")
	tlsCert := flag.String("tls-cert", "", "serving certificate of the kubelet API (from the cluster's CA)")
	tlsKey := flag.String("tls-key", "", "its key")
	clientCA := flag.String("client-ca", "", "CA of the API server's client certificate")
	listen := flag.String("listen", "127.0.0.1:0", "address of the kubelet API")
	exitWithStdin := flag.Bool("exit-with-stdin", false, "exit when standard input reaches EOF (the parent died)")
	verbose := flag.Bool("v", false, "debug logging")
	flag.Parse()
	if *kubeconfig == "" || *dir == "" || *tlsCert == "" || *tlsKey == "" || *clientCA == "" {
		flag.Usage()
		os.Exit(2)
	}

	logger := logrus.New()
	logger.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	if *verbose {
		logger.SetLevel(logrus.DebugLevel)
	} else {
		logger.SetLevel(logrus.InfoLevel)
	}
	log.L = logruslogger.FromLogrus(logrus.NewEntry(logger))

	ctx, cancel := context.WithCancel(context.Background())
	stop := make(chan string, 3)
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() { stop <- (<-signals).String() }()
	if *exitWithStdin {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			stop <- "end of standard input"
		}()
	}

	provider, err := newProvider(*dir, *name)
	if err != nil {
		fatal(err)
	}
	exit := func(code int) {
		cancel()
		provider.shutdown(2 * time.Second)
		os.Exit(code)
	}

	errc := make(chan error, 1)
	go func() { errc <- run(ctx, provider, *kubeconfig, *name, *tlsCert, *tlsKey, *clientCA, *listen) }()
	select {
	case why := <-stop:
		logger.Infof("stopping (%s): killing every process group of this node", why)
		exit(0)
	case err := <-errc:
		fmt.Fprintf(os.Stderr, "local-node: %v\n", err)
		exit(1)
	}
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "local-node: %v\n", err)
	os.Exit(1)
}

func run(ctx context.Context, p *Provider, kubeconfig, name, tlsCert, tlsKey, clientCA, listen string) error {
	config, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return fmt.Errorf("reading %s: %w", kubeconfig, err)
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		return err
	}

	// The kubelet API, on a port the kernel picks: the Node's status tells the API server which.
	listener, err := serveTLS(tlsCert, tlsKey, clientCA, listen)
	if err != nil {
		return err
	}
	port := listener.Addr().(*net.TCPAddr).Port

	podInformers := informers.NewSharedInformerFactoryWithOptions(client, time.Minute,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", name).String()
		}))
	otherInformers := informers.NewSharedInformerFactoryWithOptions(client, time.Minute)
	podInformer := podInformers.Core().V1().Pods()
	p.secrets = otherInformers.Core().V1().Secrets().Lister()
	p.configMaps = otherInformers.Core().V1().ConfigMaps().Lister()
	p.podClient = client.CoreV1()

	mux := http.NewServeMux()
	mux.Handle("/", api.PodHandler(api.PodHandlerConfig{
		RunInContainer:    p.RunInContainer,
		AttachToContainer: p.AttachToContainer,
		PortForward:       p.PortForward,
		GetContainerLogs:  p.GetContainerLogs,
		GetPods:           p.GetPods,
		GetPodsFromKubernetes: func(context.Context) ([]*corev1.Pod, error) {
			return podInformer.Lister().List(labels.Everything())
		},
		StreamIdleTimeout:     4 * time.Hour, // as the kubelet's default
		StreamCreationTimeout: 30 * time.Second,
	}, false))
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 30 * time.Second}
	go func() { _ = server.Serve(listener) }()
	defer server.Close()

	broadcaster := record.NewBroadcaster()
	broadcaster.StartRecordingToSink(&corev1client.EventSinkImpl{Interface: client.CoreV1().Events(corev1.NamespaceAll)})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "kubelet", Host: name})

	pc, err := node.NewPodController(node.PodControllerConfig{
		PodClient:         client.CoreV1(),
		PodInformer:       podInformer,
		EventRecorder:     recorder,
		Provider:          p,
		SecretInformer:    otherInformers.Core().V1().Secrets(),
		ConfigMapInformer: otherInformers.Core().V1().ConfigMaps(),
		ServiceInformer:   otherInformers.Core().V1().Services(),
	})
	if err != nil {
		return err
	}
	nc, err := node.NewNodeController(node.NaiveNodeProvider{}, nodeSpec(name, port), client.CoreV1().Nodes(),
		node.WithNodeEnableLeaseV1(client.CoordinationV1().Leases(corev1.NamespaceNodeLease), node.DefaultLeaseDuration))
	if err != nil {
		return err
	}

	go podInformers.Start(ctx.Done())
	go otherInformers.Start(ctx.Done())
	go func() { _ = pc.Run(ctx, runtime.NumCPU()) }()
	select {
	case <-ctx.Done():
		return nil
	case <-pc.Ready():
	case <-pc.Done():
		return fmt.Errorf("pod controller: %w", pc.Err())
	}
	go func() { _ = nc.Run(ctx) }()
	select {
	case <-ctx.Done():
		return nil
	case <-nc.Ready():
		log.G(ctx).Infof("node %s registered and Ready; kubelet API on 127.0.0.1:%d", name, port)
	case <-nc.Done():
		return fmt.Errorf("node controller: %w", nc.Err())
	}
	select {
	case <-ctx.Done():
		return nil
	case <-nc.Done():
		return fmt.Errorf("node controller: %w", nc.Err())
	case <-pc.Done():
		return fmt.Errorf("pod controller: %w", pc.Err())
	}
}

// serveTLS listens with the node's serving certificate and lets in only the API server.
func serveTLS(certFile, keyFile, clientCAFile, listen string) (net.Listener, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(clientCAFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("no certificate in %s", clientCAFile)
	}
	config := &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		MinVersion:   tls.VersionTLS12,
		NextProtos:   []string{"http/1.1"}, // exec, attach and port-forward upgrade the connection
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || cs.PeerCertificates[0].Subject.CommonName != apiServerClientCN {
				return errors.New("only the API server may call the kubelet API")
			}
			return nil
		},
	}
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, err
	}
	return tls.NewListener(l, config), nil
}

func nodeSpec(name string, port int) *corev1.Node {
	now := metav1.Now()
	condition := func(t corev1.NodeConditionType, status corev1.ConditionStatus, reason, message string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: status, Reason: reason, Message: message, LastHeartbeatTime: now, LastTransitionTime: now}
	}
	resources := corev1.ResourceList{
		corev1.ResourceCPU:    *resource.NewQuantity(int64(runtime.NumCPU()), resource.DecimalSI),
		corev1.ResourceMemory: *resource.NewQuantity(memTotal(), resource.BinarySI),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: name,
			Labels: map[string]string{
				"kubernetes.io/hostname": name,
				"kubernetes.io/os":       runtime.GOOS,
				"kubernetes.io/arch":     runtime.GOARCH,
				"type":                   "virtual-kubelet",
			},
		},
		Status: corev1.NodeStatus{
			Phase:       corev1.NodeRunning,
			Capacity:    resources,
			Allocatable: resources,
			Conditions: []corev1.NodeCondition{
				condition(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "containers run as local processes"),
				condition(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", ""),
				condition(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", ""),
				condition(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", ""),
				condition(corev1.NodeNetworkUnavailable, corev1.ConditionFalse, "RouteCreated", "pods share the host's network"),
			},
			Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeInternalIP, Address: "127.0.0.1"},
				{Type: corev1.NodeHostName, Address: name},
			},
			DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: int32(port)}},
			NodeInfo: corev1.NodeSystemInfo{
				OperatingSystem:         runtime.GOOS,
				Architecture:            runtime.GOARCH,
				KubeletVersion:          KubeletVersion,
				ContainerRuntimeVersion: "local-process://1",
				OSImage:                 "local processes (task-broker local-node)",
			},
		},
	}
}

func memTotal() int64 {
	data, err := os.ReadFile("/proc/meminfo")
	if err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
				if kb, err := strconv.ParseInt(f[1], 10, 64); err == nil {
					return kb * 1024
				}
			}
		}
	}
	return 4 << 30
}

