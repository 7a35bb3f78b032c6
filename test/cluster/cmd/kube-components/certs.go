package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// certsMain writes the cluster's CA and one key pair per identity into --dir (Node's crypto cannot
// issue X.509 certificates, so this is done here):
//
//	ca.crt, ca.key                           the cluster's CA (the API server's --client-ca-file and
//	                                         --kubelet-certificate-authority)
//	scheduler.crt/.key                       client: CN system:kube-scheduler
//	controller-manager.crt/.key              client: CN system:kube-controller-manager
//	node.crt/.key                            client: CN system:node:NAME, O system:nodes
//	node-serving.crt/.key                    server: the node's kubelet API, for 127.0.0.1, localhost and NAME
//	apiserver-kubelet-client.crt/.key        client: the API server towards the node
//	                                         (CN kube-apiserver-kubelet-client, O system:masters)
func certsMain(args []string) int {
	fs := flag.NewFlagSet("certs", flag.ExitOnError)
	dir := fs.String("dir", "", "directory to write into (created with mode 0700)")
	nodeName := fs.String("node-name", "local-node", "the node's name")
	_ = fs.Parse(args)
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "certs: --dir is required")
		return 2
	}
	if err := writeCerts(*dir, *nodeName); err != nil {
		fmt.Fprintf(os.Stderr, "certs: %v\n", err)
		return 1
	}
	return 0
}

type identity struct {
	file   string
	cn     string
	orgs   []string
	server bool
	dns    []string
	ips    []net.IP
}

func writeCerts(dir, nodeName string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTemplate := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "task-broker-local-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	if err := writePair(dir, "ca", caDER, caKey); err != nil {
		return err
	}
	identities := []identity{
		{file: "scheduler", cn: "system:kube-scheduler"},
		{file: "controller-manager", cn: "system:kube-controller-manager"},
		{file: "node", cn: "system:node:" + nodeName, orgs: []string{"system:nodes"}},
		{file: "node-serving", cn: "system:node:" + nodeName, orgs: []string{"system:nodes"}, server: true,
			dns: []string{"localhost", nodeName}, ips: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")}},
		{file: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}},
	}
	for _, id := range identities {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		template := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: id.cn, Organization: id.orgs},
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(365 * 24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			DNSNames:     id.dns,
			IPAddresses:  id.ips,
		}
		if id.server {
			template.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		}
		der, err := x509.CreateCertificate(rand.Reader, template, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		if err := writePair(dir, id.file, der, key); err != nil {
			return err
		}
	}
	return nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n
}

func writePair(dir, name string, der []byte, key *ecdsa.PrivateKey) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, name+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)
}
