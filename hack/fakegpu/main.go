// fake-gpu-plugin: a kubelet device plugin (the deviceplugin/v1beta1 gRPC API) that
// advertises GPUs this machine does not have, so that a pod asking for nvidia.com/gpu on the
// dev cluster goes through the kubelet's real admission and allocation path: the container
// gets the allocation environment an NVIDIA plugin would give (NVIDIA_VISIBLE_DEVICES).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	devices []*pluginapi.Device
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *plugin) ListAndWatch(_ *pluginapi.Empty, stream pluginapi.DevicePlugin_ListAndWatchServer) error {
	if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: p.devices}); err != nil {
		return err
	}
	<-stream.Context().Done() // the devices never change
	return nil
}

func (p *plugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for _, c := range req.ContainerRequests {
		log.Printf("allocate %v", c.DevicesIds)
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{
				"NVIDIA_VISIBLE_DEVICES": strings.Join(c.DevicesIds, ","),
				"KUBETUNE_FAKE_GPU":      "1",
			},
		})
	}
	return resp, nil
}

func (p *plugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

func (p *plugin) GetPreferredAllocation(context.Context, *pluginapi.PreferredAllocationRequest) (*pluginapi.PreferredAllocationResponse, error) {
	return &pluginapi.PreferredAllocationResponse{}, nil
}

func main() {
	count := flag.Int("count", 2, "devices to advertise")
	resource := flag.String("resource", "nvidia.com/gpu", "extended resource name")
	dir := flag.String("dir", pluginapi.DevicePluginPath, "the kubelet's device-plugin folder")
	node := flag.String("node", "", "the node's name (for the log)")
	flag.String("owner", "", "the node's folder: names this process for the dev cluster's cleanup")
	flag.Parse()

	p := &plugin{}
	for i := 0; i < *count; i++ {
		p.devices = append(p.devices, &pluginapi.Device{ID: fmt.Sprintf("fake-gpu-%d", i), Health: pluginapi.Healthy})
	}
	// the kubelet empties its device-plugin folder when it starts, then creates its socket
	kubeletSocket := filepath.Join(*dir, "kubelet.sock")
	for {
		if _, err := os.Stat(kubeletSocket); err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	endpoint := "kubetune-fake-gpu.sock"
	socket := filepath.Join(*dir, endpoint)
	_ = os.Remove(socket)
	lis, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatalf("listen %s: %v", socket, err)
	}
	srv := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(srv, p)
	go func() { log.Fatal(srv.Serve(lis)) }()

	// register with the kubelet (retried while it is not serving yet)
	kubelet := "unix://" + kubeletSocket
	for {
		conn, err := grpc.NewClient(kubelet, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
				Version: pluginapi.Version, Endpoint: endpoint, ResourceName: *resource,
			})
			cancel()
			conn.Close()
			if err == nil {
				break
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	log.Printf("node %s: %d x %s registered with the kubelet", *node, *count, *resource)
	// a restarted kubelet empties the folder: then this plugin is done
	for {
		time.Sleep(time.Second)
		if _, err := os.Stat(socket); os.IsNotExist(err) {
			log.Fatalf("%s removed (kubelet restarted)", socket)
		}
	}
}
