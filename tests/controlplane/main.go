// Command controlplane is one multi-call binary holding the real Kubernetes
// control plane (etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler) and a version-matched kubectl, built from Go modules so the
// operator's tests run against real components on machines without Docker or
// downloads. The program to run is chosen by the first argument or, when the
// binary is invoked through a symlink, by its name.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

var programs = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"}

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args
	if !known(name) {
		if len(os.Args) < 2 || !known(os.Args[1]) {
			fmt.Fprintf(os.Stderr, "usage: %s {%v} [flags]\n", name, programs)
			os.Exit(2)
		}
		name = os.Args[1]
		args = os.Args[1:]
	}
	// Each program parses os.Args itself; make it look as if it was invoked directly.
	os.Args = args
	switch name {
	case "etcd":
		etcdmain.Main(args)
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kubectl":
		os.Exit(cli.Run(kubectlcmd.NewDefaultKubectlCommand()))
	}
}

func known(name string) bool {
	for _, p := range programs {
		if p == name {
			return true
		}
	}
	return false
}
