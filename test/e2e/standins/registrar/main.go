// Command registrar stands in for csi-node-driver-registrar in make e2e,
// whose module this test machine cannot fetch. It speaks the same kubelet
// plugin-registration API (pluginregistration.v1 on
// <registration dir>/<driver>-reg.sock) and accepts the flags
// deploy/kubernetes passes to the upstream image. Production uses
// registry.k8s.io/sig-storage/csi-node-driver-registrar.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registration struct {
	registerapi.UnimplementedRegistrationServer
	driver, endpoint string
}

func (r *registration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{Type: registerapi.CSIPlugin, Name: r.driver, Endpoint: r.endpoint, SupportedVersions: []string{"1.0.0"}}, nil
}

func (r *registration) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !s.PluginRegistered {
		// The upstream registrar exits so that the pod restarts and tries again.
		log.Fatalf("kubelet refused the registration: %s", s.Error)
	}
	log.Printf("registered with kubelet")
	return &registerapi.RegistrationStatusResponse{}, nil
}

func main() {
	driver := flag.String("driver-name", "modelcache.csi.dev", "CSI driver name")
	endpoint := flag.String("kubelet-registration-path", "", "the CSI socket as kubelet sees it on the host")
	regDir := flag.String("plugin-registration-path", "/registration", "kubelet's plugin registration directory as this container sees it")
	flag.String("csi-address", "", "accepted for compatibility; the driver name is --driver-name")
	httpEndpoint := flag.String("http-endpoint", "", "host:port serving /healthz; off when empty")
	flag.Int("v", 0, "accepted for compatibility")
	flag.Parse()
	if *endpoint == "" {
		log.Fatal("--kubelet-registration-path is required")
	}
	if *httpEndpoint != "" {
		go func() {
			mux := http.NewServeMux()
			mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
			log.Fatal(http.ListenAndServe(*httpEndpoint, mux))
		}()
	}
	sock := filepath.Join(*regDir, *driver+"-reg.sock")
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, &registration{driver: *driver, endpoint: *endpoint})
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
		<-sig
		srv.Stop()
	}()
	log.Printf("serving %s for %s at %s", sock, *driver, *endpoint)
	err = srv.Serve(l)
	_ = os.Remove(sock)
	if err != nil {
		log.Fatal(err)
	}
}
