// Command tensorwasm-gpu-plugin is the GPU node's device plugin: it advertises nvidia.com/gpu to the
// kubelet (one device per /dev/nvidiaN, times -replicas so MPS shards can share a GPU) and answers
// Allocate with CDI device names (tensorwasm.io/gpu=N), which containerd resolves through the CDI
// spec hack/gpunode/cdi.py writes: device nodes, the driver folder and its environment. The pod spec
// asks for nvidia.com/gpu only, as on a cluster with NVIDIA's own plugin.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	gpus     []string // indices of /dev/nvidiaN
	replicas int
	cdiKind  string
}

func deviceID(gpu string, replica int) string { return fmt.Sprintf("gpu%s-%d", gpu, replica) }

func (p *plugin) devices() []*pluginapi.Device {
	var out []*pluginapi.Device
	for _, g := range p.gpus {
		for r := 0; r < p.replicas; r++ {
			out = append(out, &pluginapi.Device{ID: deviceID(g, r), Health: pluginapi.Healthy})
		}
	}
	return out
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *plugin) ListAndWatch(_ *pluginapi.Empty, s pluginapi.DevicePlugin_ListAndWatchServer) error {
	if err := s.Send(&pluginapi.ListAndWatchResponse{Devices: p.devices()}); err != nil {
		return err
	}
	<-s.Context().Done()
	return nil
}

var idRe = regexp.MustCompile(`^gpu(\d+)-\d+$`)

func (p *plugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for _, c := range req.ContainerRequests {
		seen := map[string]bool{}
		car := &pluginapi.ContainerAllocateResponse{}
		for _, id := range c.DevicesIds {
			m := idRe.FindStringSubmatch(id)
			if m == nil {
				return nil, fmt.Errorf("unknown device %q", id)
			}
			if !seen[m[1]] {
				seen[m[1]] = true
				car.CdiDevices = append(car.CdiDevices, &pluginapi.CDIDevice{Name: p.cdiKind + "=" + m[1]})
			}
		}
		log.Printf("allocate %v -> %v", c.DevicesIds, car.CdiDevices)
		resp.ContainerResponses = append(resp.ContainerResponses, car)
	}
	return resp, nil
}

func (p *plugin) GetPreferredAllocation(context.Context, *pluginapi.PreferredAllocationRequest) (*pluginapi.PreferredAllocationResponse, error) {
	return &pluginapi.PreferredAllocationResponse{}, nil
}

func (p *plugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

func register(kubeletSock, endpoint, resource string) error {
	conn, err := grpc.NewClient("unix://"+kubeletSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version: pluginapi.Version, Endpoint: endpoint, ResourceName: resource,
	})
	return err
}

func inode(path string) uint64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return statIno(fi)
}

func main() {
	dir := flag.String("dir", pluginapi.DevicePluginPath, "the kubelet's device-plugins folder (holds kubelet.sock)")
	replicas := flag.Int("replicas", 1, "devices advertised per GPU (shards sharing one GPU through MPS)")
	resource := flag.String("resource", "nvidia.com/gpu", "extended resource name")
	cdiKind := flag.String("cdi-kind", "tensorwasm.io/gpu", "CDI vendor/class of the devices")
	flag.Parse()

	matches, _ := filepath.Glob("/dev/nvidia[0-9]*")
	var gpus []string
	for _, m := range matches {
		gpus = append(gpus, strings.TrimPrefix(filepath.Base(m), "nvidia"))
	}
	sort.Strings(gpus)
	if len(gpus) == 0 {
		log.Fatal("no /dev/nvidiaN device")
	}
	p := &plugin{gpus: gpus, replicas: *replicas, cdiKind: *cdiKind}
	endpoint := "tensorwasm-gpu.sock"
	sock := filepath.Join(*dir, endpoint)
	kubeletSock := filepath.Join(*dir, "kubelet.sock")
	for {
		// (Re)serve and (re)register whenever the kubelet (re)creates its socket: a restarted
		// kubelet forgets its plugins and removes their sockets.
		for inode(kubeletSock) == 0 {
			time.Sleep(500 * time.Millisecond)
		}
		ino := inode(kubeletSock)
		_ = os.Remove(sock)
		lis, err := net.Listen("unix", sock)
		if err != nil {
			log.Fatal(err)
		}
		srv := grpc.NewServer()
		pluginapi.RegisterDevicePluginServer(srv, p)
		go func() { _ = srv.Serve(lis) }()
		if err := register(kubeletSock, endpoint, *resource); err != nil {
			log.Printf("register: %v (retrying)", err)
			srv.Stop()
			time.Sleep(time.Second)
			continue
		}
		log.Printf("registered %s: %d GPU(s) x %d replicas", *resource, len(gpus), *replicas)
		for inode(kubeletSock) == ino && inode(sock) != 0 {
			time.Sleep(time.Second)
		}
		log.Printf("kubelet socket changed: registering again")
		srv.Stop()
	}
}
