package main

import (
	"context"
	"testing"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

func TestDevicesAreReplicatedPerGPU(t *testing.T) {
	p := &plugin{gpus: []string{"0", "1"}, replicas: 3, cdiKind: "tensorwasm.io/gpu"}
	devs := p.devices()
	if len(devs) != 6 {
		t.Fatalf("want 6 devices, got %d", len(devs))
	}
	seen := map[string]bool{}
	for _, d := range devs {
		if seen[d.ID] || d.Health != pluginapi.Healthy {
			t.Fatalf("duplicate or unhealthy device %v", d)
		}
		seen[d.ID] = true
	}
}

func TestAllocateAnswersOneCDINamePerGPU(t *testing.T) {
	p := &plugin{gpus: []string{"0", "1"}, replicas: 4, cdiKind: "tensorwasm.io/gpu"}
	resp, err := p.Allocate(context.Background(), &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{
		{DevicesIds: []string{"gpu1-0", "gpu1-3"}},
		{DevicesIds: []string{"gpu0-2", "gpu1-1"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	var got [][]string
	for _, c := range resp.ContainerResponses {
		var names []string
		for _, d := range c.CdiDevices {
			names = append(names, d.Name)
		}
		got = append(got, names)
	}
	want := [][]string{{"tensorwasm.io/gpu=1"}, {"tensorwasm.io/gpu=0", "tensorwasm.io/gpu=1"}}
	if len(got) != 2 || len(got[0]) != 1 || got[0][0] != want[0][0] || len(got[1]) != 2 || got[1][0] != want[1][0] || got[1][1] != want[1][1] {
		t.Fatalf("want %v, got %v", want, got)
	}
}

func TestAllocateRefusesUnknownDevices(t *testing.T) {
	p := &plugin{gpus: []string{"0"}, replicas: 1, cdiKind: "tensorwasm.io/gpu"}
	_, err := p.Allocate(context.Background(), &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{
		{DevicesIds: []string{"nvidia0"}},
	}})
	if err == nil {
		t.Fatal("an unknown device ID was allocated")
	}
}
