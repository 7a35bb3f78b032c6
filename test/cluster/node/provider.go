package main

// The provider: every container of a pod bound to this node is a local process.
//
//   - the process is the container's `command` + `args` (with $(VAR) references expanded); the
//     image is only a name (no image is pulled or unpacked); with no command, `args` alone is the
//     process (as for images with no entrypoint, such as busybox); with neither it cannot start;
//   - it runs in its own directory, DIR/pods/NS_NAME_UID/CONTAINER/ (also its HOME), with PATH from
//     the node, HOSTNAME the pod's name, and the pod's env (env and envFrom resolved by
//     virtual-kubelet); spec.workingDir is a directory below it;
//   - emptyDir, configMap and secret volumes are directories under DIR/pods/.../volumes/, each mount
//     a symbolic link in the container's directory at the mount path (without its leading "/");
//     other volume types are empty directories;
//   - init containers run one after the other, then the containers together; restartPolicy decides
//     restarts (back-off 1 s doubling to 30 s); pod status follows the processes;
//   - its stdout and stderr are its log (DIR/pods/.../logs/CONTAINER/RESTARTS.log, this and the
//     previous run kept); with spec.stdin its stdin is a pipe that `kubectl attach -i` writes into;
//   - deletion sends SIGTERM to the container's process group, SIGKILL after the grace period.
//
// Not there: isolation of any kind (no namespaces, no cgroup limits, one network for every pod and
// the host, every process runs as the node's user), probes (a running process is ready), TTYs.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/log"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	corev1listers "k8s.io/client-go/listers/core/v1"
	utilexec "k8s.io/utils/exec"
)

const (
	loopback       = "127.0.0.1"
	backoffInitial = time.Second
	backoffMax     = 30 * time.Second
)

type Provider struct {
	dir      string
	nodeName string

	secrets    corev1listers.SecretLister
	configMaps corev1listers.ConfigMapLister
	podClient  corev1client.PodsGetter // removes a deleted pod once its processes are gone

	groups *groupRegistry

	mu      sync.Mutex
	pods    map[string]*podState // by namespace/name
	closing bool
	notify  func(*corev1.Pod)
	dirty   map[string]bool
	kick    chan struct{}
}

type podState struct {
	key        string
	pod        *corev1.Pod // as given by CreatePod/UpdatePod; the status is built from the processes
	dir        string
	init       []*container
	containers []*container
	initDone   bool
	initFailed bool
	startTime  metav1.Time
	conditions map[corev1.PodConditionType]corev1.PodCondition

	stop      chan struct{} // closed when the pod is deleted or the node stops
	deleting  bool
	finalized bool // every process is gone: the next notification is the last, then the pod is forgotten
	wg        sync.WaitGroup
}

type container struct {
	spec         corev1.Container
	isInit       bool
	root         string // the container's directory (HOME; volume mounts are links in it)
	workDir      string
	logDir       string
	env          []string
	restartCount int32
	state        corev1.ContainerState
	lastState    corev1.ContainerState
	finished     bool // its loop ended: no further restart
	inst         *instance
	prevLog      string
}

// instance is one run of a container's process.
type instance struct {
	pid     int
	logFile string
	stdin   io.WriteCloser
	out     *fanout
	exited  bool
	done    chan struct{} // closed once the process has exited and its output is in the log
}

func newProvider(dir, nodeName string) (*Provider, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(abs, "pods"), 0o700); err != nil {
		return nil, err
	}
	return &Provider{
		dir:      abs,
		nodeName: nodeName,
		groups:   newGroupRegistry(filepath.Join(abs, "process-groups")),
		pods:     map[string]*podState{},
		dirty:    map[string]bool{},
		kick:     make(chan struct{}, 1),
	}, nil
}

func podKey(namespace, name string) string { return namespace + "/" + name }

// --- node.PodLifecycleHandler and node.PodNotifier ------------------------------------------------

func (p *Provider) CreatePod(ctx context.Context, pod *corev1.Pod) error {
	key := podKey(pod.Namespace, pod.Name)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closing {
		return errors.New("the node is stopping")
	}
	if old, ok := p.pods[key]; ok {
		if old.pod.UID == pod.UID {
			return nil
		}
		return fmt.Errorf("the previous pod %s (uid %s) is still terminating", key, old.pod.UID)
	}
	ps := &podState{
		key:        key,
		pod:        pod.DeepCopy(),
		dir:        filepath.Join(p.dir, "pods", fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID)),
		startTime:  metav1.Now(),
		conditions: map[corev1.PodConditionType]corev1.PodCondition{},
		stop:       make(chan struct{}),
	}
	for _, c := range pod.Spec.InitContainers {
		ps.init = append(ps.init, p.newContainer(ps, c, true))
	}
	for _, c := range pod.Spec.Containers {
		ps.containers = append(ps.containers, p.newContainer(ps, c, false))
	}
	p.pods[key] = ps
	ps.wg.Add(1)
	go p.runPod(ps)
	p.markDirtyLocked(key)
	log.G(ctx).Infof("pod %s: created (%d init containers, %d containers)", key, len(ps.init), len(ps.containers))
	return nil
}

func (p *Provider) newContainer(ps *podState, spec corev1.Container, isInit bool) *container {
	root := filepath.Join(ps.dir, spec.Name)
	workDir := root
	if spec.WorkingDir != "" {
		workDir = filepath.Join(root, filepath.Clean("/"+spec.WorkingDir))
	}
	return &container{
		spec:    spec,
		isInit:  isInit,
		root:    root,
		workDir: workDir,
		logDir:  filepath.Join(ps.dir, "logs", spec.Name),
		state:   corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}},
	}
}

func (p *Provider) UpdatePod(ctx context.Context, pod *corev1.Pod) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	ps, ok := p.pods[podKey(pod.Namespace, pod.Name)]
	if !ok || ps.pod.UID != pod.UID {
		return errdefs.NotFoundf("pod %s/%s is not on this node", pod.Namespace, pod.Name)
	}
	// Labels, annotations, images, tolerations: none changes a running process.
	ps.pod = pod.DeepCopy()
	return nil
}

func (p *Provider) DeletePod(ctx context.Context, pod *corev1.Pod) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	ps, ok := p.pods[podKey(pod.Namespace, pod.Name)]
	if !ok || ps.pod.UID != pod.UID {
		return errdefs.NotFoundf("pod %s/%s is not on this node", pod.Namespace, pod.Name)
	}
	if ps.deleting {
		return nil
	}
	grace := int64(corev1.DefaultTerminationGracePeriodSeconds)
	if pod.DeletionGracePeriodSeconds != nil {
		grace = *pod.DeletionGracePeriodSeconds
	} else if pod.Spec.TerminationGracePeriodSeconds != nil {
		grace = *pod.Spec.TerminationGracePeriodSeconds
	}
	log.G(ctx).Infof("pod %s: deleting (SIGTERM, SIGKILL after %d s)", ps.key, grace)
	p.terminateLocked(ps, time.Duration(grace)*time.Second)
	return nil
}

// terminateLocked stops a pod's processes: SIGTERM to each group now, SIGKILL after grace; once all
// are gone the pod reports its final status and is forgotten.
func (p *Provider) terminateLocked(ps *podState, grace time.Duration) {
	ps.deleting = true
	close(ps.stop)
	p.signalPodLocked(ps, syscall.SIGTERM)
	timer := time.AfterFunc(grace, func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		p.signalPodLocked(ps, syscall.SIGKILL)
	})
	go func() {
		ps.wg.Wait()
		timer.Stop()
		p.mu.Lock()
		ps.finalized = true
		p.markDirtyLocked(ps.key)
		p.mu.Unlock()
	}()
}

func (p *Provider) signalPodLocked(ps *podState, sig syscall.Signal) {
	for _, c := range append(append([]*container{}, ps.init...), ps.containers...) {
		if c.inst != nil && !c.inst.exited {
			_ = syscall.Kill(-c.inst.pid, sig)
		}
	}
}

func (p *Provider) GetPod(ctx context.Context, namespace, name string) (*corev1.Pod, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ps, ok := p.pods[podKey(namespace, name)]
	if !ok {
		return nil, errdefs.NotFoundf("pod %s/%s is not on this node", namespace, name)
	}
	return p.snapshotLocked(ps), nil
}

func (p *Provider) GetPodStatus(ctx context.Context, namespace, name string) (*corev1.PodStatus, error) {
	pod, err := p.GetPod(ctx, namespace, name)
	if err != nil {
		return nil, err
	}
	return &pod.Status, nil
}

func (p *Provider) GetPods(ctx context.Context) ([]*corev1.Pod, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pods := make([]*corev1.Pod, 0, len(p.pods))
	for _, ps := range p.pods {
		pods = append(pods, p.snapshotLocked(ps))
	}
	return pods, nil
}

// NotifyPods: statuses are pushed from one goroutine, each built when it is sent (never stale).
func (p *Provider) NotifyPods(ctx context.Context, cb func(*corev1.Pod)) {
	p.mu.Lock()
	p.notify = cb
	p.mu.Unlock()
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-p.kick:
			}
			p.mu.Lock()
			keys := make([]string, 0, len(p.dirty))
			for k := range p.dirty {
				keys = append(keys, k)
			}
			p.dirty = map[string]bool{}
			p.mu.Unlock()
			for _, key := range keys {
				p.mu.Lock()
				ps, ok := p.pods[key]
				var pod *corev1.Pod
				var final, deleting bool
				if ok {
					pod = p.snapshotLocked(ps)
					final, deleting = ps.finalized, ps.deleting
				}
				p.mu.Unlock()
				if !ok {
					continue
				}
				cb(pod)
				if final {
					p.forget(ps)
					if deleting {
						go p.remove(ctx, pod)
					}
				}
			}
		}
	}()
}

// remove deletes a pod whose deletion was asked and whose processes are all gone, as the kubelet
// does (virtual-kubelet alone would wait for the whole grace period).
func (p *Provider) remove(ctx context.Context, pod *corev1.Pod) {
	if p.podClient == nil {
		return
	}
	zero := int64(0)
	err := p.podClient.Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero,
		Preconditions:      &metav1.Preconditions{UID: &pod.UID},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		log.G(ctx).Warnf("pod %s/%s: could not remove it: %v", pod.Namespace, pod.Name, err)
	}
}

func (p *Provider) forget(ps *podState) {
	p.mu.Lock()
	if p.pods[ps.key] == ps {
		delete(p.pods, ps.key)
	}
	p.mu.Unlock()
	_ = os.RemoveAll(ps.dir)
}

func (p *Provider) markDirtyLocked(key string) {
	p.dirty[key] = true
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// --- running a pod ----------------------------------------------------------------------------------

func (p *Provider) runPod(ps *podState) {
	defer ps.wg.Done()
	if err := p.prepare(ps); err != nil {
		log.L.Errorf("pod %s: %v", ps.key, err)
		p.mu.Lock()
		for _, c := range append(append([]*container{}, ps.init...), ps.containers...) {
			c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "CreateContainerConfigError", Message: err.Error()}}
		}
		p.markDirtyLocked(ps.key)
		p.mu.Unlock()
		return
	}
	for _, c := range ps.init {
		if ok := p.runContainer(ps, c); !ok {
			p.mu.Lock()
			select {
			case <-ps.stop:
			default:
				ps.initFailed = true
				for _, c := range ps.containers {
					c.finished = true
				}
			}
			p.markDirtyLocked(ps.key)
			p.mu.Unlock()
			return
		}
	}
	p.mu.Lock()
	ps.initDone = true
	p.markDirtyLocked(ps.key)
	p.mu.Unlock()
	for _, c := range ps.containers {
		ps.wg.Add(1)
		go func(c *container) {
			defer ps.wg.Done()
			p.runContainer(ps, c)
		}(c)
	}
}

// prepare makes the pod's directories, its volumes and each container's links to them.
func (p *Provider) prepare(ps *podState) error {
	volumes := filepath.Join(ps.dir, "volumes")
	if err := os.MkdirAll(volumes, 0o700); err != nil {
		return err
	}
	for _, v := range ps.pod.Spec.Volumes {
		dir := filepath.Join(volumes, v.Name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if err := p.fillVolume(ps.pod.Namespace, v, dir); err != nil {
			return fmt.Errorf("volume %q: %w", v.Name, err)
		}
	}
	for _, c := range append(append([]*container{}, ps.init...), ps.containers...) {
		for _, d := range []string{c.root, c.workDir, c.logDir} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				return err
			}
		}
		for _, m := range c.spec.VolumeMounts {
			target := filepath.Join(volumes, m.Name, filepath.Clean("/"+m.SubPath))
			link := filepath.Join(c.root, filepath.Clean("/"+m.MountPath))
			if link == c.root {
				continue
			}
			if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
				return err
			}
			if err := os.MkdirAll(target, 0o755); err != nil {
				return err
			}
			if err := os.Symlink(target, link); err != nil && !os.IsExist(err) {
				return err
			}
		}
		env := []string{"PATH=" + nodePath(), "HOME=" + c.root, "HOSTNAME=" + ps.pod.Name}
		for _, e := range c.spec.Env {
			env = append(env, e.Name+"="+e.Value)
		}
		c.env = env
	}
	return nil
}

func (p *Provider) fillVolume(namespace string, v corev1.Volume, dir string) error {
	write := func(data map[string][]byte, items []corev1.KeyToPath) error {
		if len(items) == 0 {
			for k := range data {
				items = append(items, corev1.KeyToPath{Key: k, Path: k})
			}
		}
		for _, item := range items {
			value, ok := data[item.Key]
			if !ok {
				continue
			}
			path := filepath.Join(dir, filepath.Clean("/"+item.Path))
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				return err
			}
			if err := os.WriteFile(path, value, 0o644); err != nil {
				return err
			}
		}
		return nil
	}
	switch {
	case v.ConfigMap != nil && p.configMaps != nil:
		cm, err := p.configMaps.ConfigMaps(namespace).Get(v.ConfigMap.Name)
		if err != nil {
			if v.ConfigMap.Optional != nil && *v.ConfigMap.Optional {
				return nil
			}
			return err
		}
		data := map[string][]byte{}
		for k, s := range cm.Data {
			data[k] = []byte(s)
		}
		for k, b := range cm.BinaryData {
			data[k] = b
		}
		return write(data, v.ConfigMap.Items)
	case v.Secret != nil && p.secrets != nil:
		s, err := p.secrets.Secrets(namespace).Get(v.Secret.SecretName)
		if err != nil {
			if v.Secret.Optional != nil && *v.Secret.Optional {
				return nil
			}
			return err
		}
		return write(s.Data, v.Secret.Items)
	}
	return nil
}

func nodePath() string {
	if path := os.Getenv("PATH"); path != "" {
		return path
	}
	return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
}

// runContainer runs a container until it needs no restart; true when its last run exited 0.
func (p *Provider) runContainer(ps *podState, c *container) bool {
	backoff := backoffInitial
	for {
		started := time.Now()
		code := p.runOnce(ps, c)
		restart := false
		switch ps.pod.Spec.RestartPolicy {
		case corev1.RestartPolicyNever:
		case corev1.RestartPolicyOnFailure:
			restart = code != 0
		default: // Always; an init container is restarted only when it failed
			restart = code != 0 || !c.isInit
		}
		p.mu.Lock()
		stopping := p.closing
		select {
		case <-ps.stop:
			stopping = true
		default:
		}
		if !restart || stopping {
			c.finished = true
			p.markDirtyLocked(ps.key)
			p.mu.Unlock()
			return code == 0
		}
		if time.Since(started) > time.Minute {
			backoff = backoffInitial
		}
		c.lastState = c.state
		c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{
			Reason:  "CrashLoopBackOff",
			Message: fmt.Sprintf("back-off %s restarting the container (exit code %d)", backoff, code),
		}}
		p.markDirtyLocked(ps.key)
		p.mu.Unlock()
		select {
		case <-time.After(backoff):
		case <-ps.stop:
		}
		backoff = min(backoff*2, backoffMax)
		p.mu.Lock()
		c.restartCount++
		p.mu.Unlock()
	}
}

// runOnce starts the container's process, waits for it and returns its exit code (128+signal when
// killed by one; 128 when it could not start).
func (p *Provider) runOnce(ps *podState, c *container) int {
	argv := append(append([]string{}, c.spec.Command...), c.spec.Args...)
	envMap := map[string]string{}
	for _, kv := range c.env {
		k, v, _ := strings.Cut(kv, "=")
		envMap[k] = v
	}
	for i := range argv {
		argv[i] = expand(argv[i], envMap)
	}
	logFile := filepath.Join(c.logDir, fmt.Sprintf("%d.log", c.restartCount))
	if c.restartCount >= 2 {
		_ = os.Remove(filepath.Join(c.logDir, fmt.Sprintf("%d.log", c.restartCount-2)))
	}

	fail := func(reason string, err error) int {
		p.mu.Lock()
		now := metav1.Now()
		c.state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
			ExitCode: 128, Reason: reason, Message: err.Error(), StartedAt: now, FinishedAt: now,
		}}
		p.markDirtyLocked(ps.key)
		p.mu.Unlock()
		log.L.Warnf("pod %s container %s: %s: %v", ps.key, c.spec.Name, reason, err)
		return 128
	}
	if len(argv) == 0 {
		return fail("StartError", fmt.Errorf("no command and no args: on this node a container is the process its command and args name (the image %q is only a name)", c.spec.Image))
	}

	lw, err := newLogWriter(logFile)
	if err != nil {
		return fail("StartError", err)
	}
	defer lw.close()
	outR, outW, err := os.Pipe()
	if err != nil {
		return fail("StartError", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		return fail("StartError", err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = c.workDir
	cmd.Env = c.env
	cmd.Stdout = outW
	cmd.Stderr = errW
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	var stdin io.WriteCloser
	var stdinR *os.File
	if c.spec.Stdin {
		r, w, err := os.Pipe()
		if err != nil {
			return fail("StartError", err)
		}
		stdinR, stdin = r, w
		cmd.Stdin = r
	}

	inst := &instance{logFile: logFile, stdin: stdin, out: newFanout(), done: make(chan struct{})}
	p.mu.Lock()
	stopped := p.closing
	select {
	case <-ps.stop:
		stopped = true
	default:
	}
	if stopped {
		p.mu.Unlock()
		closeAll(outR, outW, errR, errW, stdinR, stdin)
		return 128 + int(syscall.SIGTERM)
	}
	if err := cmd.Start(); err != nil {
		p.mu.Unlock()
		closeAll(outR, outW, errR, errW, stdinR, stdin)
		return fail("StartError", err)
	}
	inst.pid = cmd.Process.Pid
	p.groups.add(inst.pid)
	if c.inst != nil {
		c.prevLog = c.inst.logFile
	}
	c.inst = inst
	c.state = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1.Now()}}
	startedAt := c.state.Running.StartedAt
	p.markDirtyLocked(ps.key)
	p.mu.Unlock()
	closeAll(outW, errW, stdinR)
	log.L.Infof("pod %s container %s: started %q (pid %d, restarts %d)", ps.key, c.spec.Name, argv, inst.pid, c.restartCount)

	var readers sync.WaitGroup
	for _, s := range []struct {
		r    *os.File
		name string
	}{{outR, "stdout"}, {errR, "stderr"}} {
		readers.Add(1)
		go func() {
			defer readers.Done()
			buf := make([]byte, 32*1024)
			for {
				n, err := s.r.Read(buf)
				if n > 0 {
					lw.write(s.name, buf[:n])
					inst.out.write(s.name, buf[:n])
				}
				if err != nil {
					return
				}
			}
		}()
	}

	waitErr := cmd.Wait()
	// As a container's end ends every process in it: whatever the process left behind in its group goes too.
	_ = syscall.Kill(-inst.pid, syscall.SIGKILL)
	p.groups.remove(inst.pid)
	readersDone := make(chan struct{})
	go func() { readers.Wait(); close(readersDone) }()
	select {
	case <-readersDone:
	case <-time.After(2 * time.Second): // a process that left the group still holds the pipe
	}
	closeAll(outR, errR)
	if stdin != nil {
		_ = stdin.Close()
	}

	code := 0
	reason := "Completed"
	var exitErr *exec.ExitError
	if errors.As(waitErr, &exitErr) {
		code = exitCode(exitErr.ProcessState)
		reason = "Error"
	} else if waitErr != nil {
		code, reason = 128, "Error"
	}
	p.mu.Lock()
	inst.exited = true
	c.state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
		ExitCode:    int32(code),
		Reason:      reason,
		StartedAt:   startedAt,
		FinishedAt:  metav1.Now(),
		ContainerID: containerID(inst.pid),
	}}
	p.markDirtyLocked(ps.key)
	p.mu.Unlock()
	close(inst.done)
	log.L.Infof("pod %s container %s: pid %d exited with %d", ps.key, c.spec.Name, inst.pid, code)
	return code
}

func exitCode(state *os.ProcessState) int {
	if ws, ok := state.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return state.ExitCode()
}

func containerID(pid int) string { return "process://" + strconv.Itoa(pid) }

func closeAll(closers ...io.Closer) {
	for _, c := range closers {
		if c != nil && !isNilFile(c) {
			_ = c.Close()
		}
	}
}

func isNilFile(c io.Closer) bool {
	f, ok := c.(*os.File)
	return ok && f == nil
}

// expand replaces $(NAME) with the variable's value, as the kubelet does in command and args
// ($$ is a literal $; an undefined reference stays as written).
func expand(s string, env map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 >= len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(s[i+2:], ')')
			if end < 0 {
				b.WriteString(s[i:])
				return b.String()
			}
			name := s[i+2 : i+2+end]
			if v, ok := env[name]; ok {
				b.WriteString(v)
			} else {
				b.WriteString(s[i : i+3+end])
			}
			i += 2 + end
		default:
			b.WriteByte('$')
		}
	}
	return b.String()
}

// --- status -------------------------------------------------------------------------------------------

func (p *Provider) snapshotLocked(ps *podState) *corev1.Pod {
	pod := ps.pod.DeepCopy()
	pod.Status = p.statusLocked(ps)
	return pod
}

func (p *Provider) statusLocked(ps *podState) corev1.PodStatus {
	st := corev1.PodStatus{
		HostIP:    loopback,
		HostIPs:   []corev1.HostIP{{IP: loopback}},
		PodIP:     loopback,
		PodIPs:    []corev1.PodIP{{IP: loopback}},
		StartTime: &ps.startTime,
		QOSClass:  ps.pod.Status.QOSClass,
	}
	for _, c := range ps.init {
		st.InitContainerStatuses = append(st.InitContainerStatuses, containerStatus(c))
	}
	allRunning, anyStarted, allFinished, allSucceeded := true, false, true, true
	for _, c := range ps.containers {
		st.ContainerStatuses = append(st.ContainerStatuses, containerStatus(c))
		if c.state.Running == nil {
			allRunning = false
		}
		if c.inst != nil {
			anyStarted = true
		}
		if !c.finished {
			allFinished = false
		} else if c.state.Terminated == nil || c.state.Terminated.ExitCode != 0 {
			allSucceeded = false
		}
	}
	switch {
	case ps.initFailed:
		st.Phase = corev1.PodFailed
	case !ps.initDone:
		st.Phase = corev1.PodPending
	case allFinished && allSucceeded:
		st.Phase = corev1.PodSucceeded
	case allFinished:
		st.Phase = corev1.PodFailed
	case anyStarted:
		st.Phase = corev1.PodRunning
	default:
		st.Phase = corev1.PodPending
	}
	ready := allRunning && ps.initDone && !ps.deleting
	set := func(t corev1.PodConditionType, ok bool, reason string) {
		status := corev1.ConditionFalse
		if ok {
			status, reason = corev1.ConditionTrue, ""
		}
		cond, seen := ps.conditions[t]
		if !seen || cond.Status != status {
			cond = corev1.PodCondition{Type: t, Status: status, Reason: reason, LastTransitionTime: metav1.Now()}
			ps.conditions[t] = cond
		}
		st.Conditions = append(st.Conditions, cond)
	}
	set(corev1.PodReadyToStartContainers, true, "")
	set(corev1.PodInitialized, ps.initDone, "ContainersNotInitialized")
	set(corev1.ContainersReady, ready, "ContainersNotReady")
	set(corev1.PodReady, ready, "ContainersNotReady")
	set(corev1.PodScheduled, true, "")
	return st
}

func containerStatus(c *container) corev1.ContainerStatus {
	running := c.state.Running != nil
	s := corev1.ContainerStatus{
		Name:                 c.spec.Name,
		State:                *c.state.DeepCopy(),
		LastTerminationState: *c.lastState.DeepCopy(),
		Ready:                running && !c.isInit,
		RestartCount:         c.restartCount,
		Image:                c.spec.Image,
		ImageID:              "local-process://" + c.spec.Image,
		Started:              &running,
	}
	if c.inst != nil {
		s.ContainerID = containerID(c.inst.pid)
	}
	return s
}

// --- the kubelet API: logs, exec, attach, port-forward ------------------------------------------------

func (p *Provider) findContainer(namespace, pod, name string) (*podState, *container, error) {
	ps, ok := p.pods[podKey(namespace, pod)]
	if !ok {
		return nil, nil, errdefs.NotFoundf("pod %s/%s is not on this node", namespace, pod)
	}
	for _, c := range append(append([]*container{}, ps.init...), ps.containers...) {
		if c.spec.Name == name {
			return ps, c, nil
		}
	}
	return nil, nil, errdefs.NotFoundf("container %q is not in pod %s/%s", name, namespace, pod)
}

func (p *Provider) GetContainerLogs(ctx context.Context, namespace, pod, name string, opts api.ContainerLogOpts) (io.ReadCloser, error) {
	p.mu.Lock()
	_, c, err := p.findContainer(namespace, pod, name)
	if err != nil {
		p.mu.Unlock()
		return nil, err
	}
	var file string
	done := make(chan struct{})
	switch {
	case opts.Previous:
		if c.prevLog == "" {
			p.mu.Unlock()
			return nil, errdefs.InvalidInputf("previous terminated container %q in pod %q not found", name, pod)
		}
		file = c.prevLog
		close(done)
	case c.inst == nil:
		p.mu.Unlock()
		return nil, errdefs.InvalidInputf("container %q in pod %q is waiting to start", name, pod)
	default:
		file = c.inst.logFile
		done = c.inst.done
	}
	p.mu.Unlock()
	return streamLog(ctx, file, done, opts), nil
}

func (p *Provider) RunInContainer(ctx context.Context, namespace, pod, name string, argv []string, attach api.AttachIO) error {
	p.mu.Lock()
	_, c, err := p.findContainer(namespace, pod, name)
	if err != nil {
		p.mu.Unlock()
		return err
	}
	if c.state.Running == nil {
		p.mu.Unlock()
		return errdefs.InvalidInputf("container %q in pod %q is not running", name, pod)
	}
	dir, env := c.workDir, append([]string{}, c.env...)
	p.mu.Unlock()
	if len(argv) == 0 {
		return errdefs.InvalidInput("no command")
	}

	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = dir
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 2 * time.Second
	if out := attach.Stdout(); out != nil {
		cmd.Stdout = out
	}
	if e := attach.Stderr(); e != nil {
		cmd.Stderr = e
	} else if attach.TTY() && attach.Stdout() != nil {
		cmd.Stderr = attach.Stdout()
	}
	var stdin io.WriteCloser
	if in := attach.Stdin(); in != nil {
		if stdin, err = cmd.StdinPipe(); err != nil {
			return err
		}
		go func() {
			_, _ = io.Copy(stdin, in)
			_ = stdin.Close()
		}()
	}
	p.mu.Lock()
	if p.closing {
		p.mu.Unlock()
		return errors.New("the node is stopping")
	}
	if err := cmd.Start(); err != nil {
		p.mu.Unlock()
		// As a shell says it: 127 for a command not found, 126 for one that cannot run.
		code := 126
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
			code = 127
		}
		if w := cmd.Stderr; w != nil {
			fmt.Fprintf(w, "%v\n", err)
		}
		return utilexec.CodeExitError{Err: err, Code: code}
	}
	pid := cmd.Process.Pid
	p.groups.add(pid)
	p.mu.Unlock()
	finished := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			_ = syscall.Kill(-pid, syscall.SIGKILL)
		case <-finished:
		}
	}()
	waitErr := cmd.Wait()
	close(finished)
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	p.groups.remove(pid)
	if cmd.ProcessState == nil {
		return waitErr
	}
	if code := exitCode(cmd.ProcessState); code != 0 {
		return utilexec.CodeExitError{Err: fmt.Errorf("command terminated with exit code %d", code), Code: code}
	}
	return nil
}

func (p *Provider) AttachToContainer(ctx context.Context, namespace, pod, name string, attach api.AttachIO) error {
	p.mu.Lock()
	_, c, err := p.findContainer(namespace, pod, name)
	if err != nil {
		p.mu.Unlock()
		return err
	}
	inst := c.inst
	if inst == nil || inst.exited {
		p.mu.Unlock()
		return errdefs.InvalidInputf("container %q in pod %q is not running", name, pod)
	}
	stdinOnce := c.spec.StdinOnce
	p.mu.Unlock()

	stderr := attach.Stderr()
	if stderr == nil && attach.TTY() {
		stderr = attach.Stdout()
	}
	id := inst.out.subscribe(attach.Stdout(), stderr)
	defer inst.out.unsubscribe(id)
	if in := attach.Stdin(); in != nil && inst.stdin != nil {
		go func() {
			_, _ = io.Copy(inst.stdin, in)
			if stdinOnce {
				_ = inst.stdin.Close()
			}
		}()
	}
	select {
	case <-ctx.Done():
	case <-inst.done:
	}
	return nil
}

func (p *Provider) PortForward(ctx context.Context, namespace, pod string, port int32, stream io.ReadWriteCloser) error {
	p.mu.Lock()
	_, ok := p.pods[podKey(namespace, pod)]
	p.mu.Unlock()
	if !ok {
		return errdefs.NotFoundf("pod %s/%s is not on this node", namespace, pod)
	}
	defer stream.Close()
	conn, err := net.DialTimeout("tcp", net.JoinHostPort(loopback, strconv.Itoa(int(port))), 5*time.Second)
	if err != nil {
		return fmt.Errorf("nothing listens on %s:%d for pod %s/%s: %w", loopback, port, namespace, pod, err)
	}
	defer conn.Close()
	back := make(chan struct{})
	go func() {
		_, _ = io.Copy(conn, stream)
		if tcp, ok := conn.(*net.TCPConn); ok {
			_ = tcp.CloseWrite()
		}
	}()
	go func() {
		_, _ = io.Copy(stream, conn)
		close(back)
	}()
	select {
	case <-back:
	case <-ctx.Done():
	}
	return nil
}

// --- stopping the node ---------------------------------------------------------------------------------

// shutdown kills every process group of this node: SIGTERM, then SIGKILL to what is left after
// grace. No restart or exec starts once it has begun.
func (p *Provider) shutdown(grace time.Duration) {
	p.mu.Lock()
	p.closing = true
	for _, ps := range p.pods {
		select {
		case <-ps.stop:
		default:
			close(ps.stop)
		}
	}
	p.mu.Unlock()
	p.groups.signalAll(syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for p.groups.len() > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	p.groups.signalAll(syscall.SIGKILL)
	deadline = time.Now().Add(time.Second)
	for p.groups.len() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	p.groups.clear()
}

// groupRegistry: the process groups alive, mirrored in a file (one pgid a line).
type groupRegistry struct {
	mu   sync.Mutex
	file string
	set  map[int]bool
}

func newGroupRegistry(file string) *groupRegistry {
	r := &groupRegistry{file: file, set: map[int]bool{}}
	r.writeLocked()
	return r
}

func (r *groupRegistry) add(pgid int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.set[pgid] = true
	r.writeLocked()
}

func (r *groupRegistry) remove(pgid int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.set, pgid)
	r.writeLocked()
}

func (r *groupRegistry) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.set)
}

func (r *groupRegistry) signalAll(sig syscall.Signal) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for pgid := range r.set {
		_ = syscall.Kill(-pgid, sig)
	}
}

func (r *groupRegistry) clear() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.set = map[int]bool{}
	r.writeLocked()
}

func (r *groupRegistry) writeLocked() {
	ids := make([]int, 0, len(r.set))
	for id := range r.set {
		ids = append(ids, id)
	}
	sort.Ints(ids)
	var b strings.Builder
	for _, id := range ids {
		fmt.Fprintf(&b, "%d\n", id)
	}
	tmp := r.file + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err == nil {
		_ = os.Rename(tmp, r.file)
	}
}
