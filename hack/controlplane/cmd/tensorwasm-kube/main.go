// Command tensorwasm-kube is every Go binary the dev cluster runs but two, in one executable (the
// old hyperkube shape): etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
// kubelet, kube-proxy, kwok, containerd and ctr. It dispatches on the name it was started as
// (build.sh makes one symlink per component), so the packages they share compile once and one link
// serves ten names: the cold build is dominated by those two costs on a small machine. Each branch is
// what that component's own main does. helm and containerd-shim-runc-v2 are main packages of their
// modules (nothing to import; containerd starts the shim, which re-executes itself, by path): go.mod
// names them as tools and build.sh builds them in the same `go build`, so they compile nothing twice.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	_ "time/tzdata" // CronJob time zones (kube-apiserver, kube-controller-manager)

	"github.com/containerd/containerd/v2/cmd/containerd/command"
	ctr "github.com/containerd/containerd/v2/cmd/ctr/app"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.etcd.io/etcd/server/v3/etcdmain"
	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl's auth plugins
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
	kwokconfig "sigs.k8s.io/kwok/pkg/config"
	kwok "sigs.k8s.io/kwok/pkg/kwok/cmd"
	kwoklog "sigs.k8s.io/kwok/pkg/log"
	kwoksignals "sigs.k8s.io/kwok/pkg/utils/signals"

	_ "github.com/containerd/containerd/v2/cmd/containerd/builtins" // containerd's plugins
)

var cobraCommands = map[string]func() *cobra.Command{
	"kube-apiserver":          apiserver.NewAPIServerCommand,
	"kube-controller-manager": controllermanager.NewControllerManagerCommand,
	"kube-scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
	"kube-proxy":              proxy.NewProxyCommand,
	"kubelet":                 func() *cobra.Command { return kubelet.NewKubeletCommand(context.Background()) },
}

func main() {
	name := filepath.Base(os.Args[0])
	switch name {
	case "etcd":
		etcdmain.Main(os.Args)
	case "containerd":
		if err := command.App().Run(context.Background(), os.Args); err != nil {
			fmt.Fprintln(os.Stderr, "containerd:", err)
			os.Exit(1)
		}
	case "ctr":
		if err := ctr.New().Run(context.Background(), os.Args); err != nil {
			fmt.Fprintln(os.Stderr, "ctr:", err)
			os.Exit(1)
		}
	case "kwok":
		kwokMain()
	case "kubectl":
		_, _ = logs.GlogSetter(kubectl.GetLogVerbosity(os.Args))
		if err := cli.RunNoErrOutput(kubectl.NewDefaultKubectlCommand()); err != nil {
			kubectlutil.CheckErr(err)
		}
	default:
		newCommand, ok := cobraCommands[name]
		if !ok {
			fmt.Fprintf(os.Stderr, "%s: run me through a symlink named one of: %s\n", name, componentNames())
			os.Exit(2)
		}
		os.Exit(cli.Run(newCommand()))
	}
}

// kwokMain is sigs.k8s.io/kwok/cmd/kwok's main.
func kwokMain() {
	// Kubernetes' verflag registers a non-bool --version on the global pflag set at init, and cobra
	// merges that set into every root command: kwok's own bool --version would then fail every run
	// ("version" flag declared as non-bool). kwok registers nothing there: give it an empty one.
	pflag.CommandLine = pflag.NewFlagSet(os.Args[0], pflag.ExitOnError)
	flagset := pflag.NewFlagSet("global", pflag.ContinueOnError)
	flagset.ParseErrorsAllowlist.UnknownFlags = true
	flagset.Usage = func() {}
	ctx := kwoksignals.SetupSignalContext()
	ctx, logger := kwoklog.InitFlags(ctx, flagset)
	ctx, err := kwokconfig.InitFlags(ctx, flagset)
	if err != nil {
		_, _ = os.Stderr.Write([]byte(flagset.FlagUsages()))
		logger.Error("Init config flags", "err", err)
		os.Exit(1)
	}
	command := kwok.NewCommand(ctx)
	command.PersistentFlags().AddFlagSet(flagset)
	if err := command.ExecuteContext(ctx); err != nil {
		logger.Error("Execute exit", "err", err)
		os.Exit(1)
	}
}

func componentNames() []string {
	names := []string{"containerd", "ctr", "etcd", "kubectl", "kwok"}
	for name := range cobraCommands {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}
