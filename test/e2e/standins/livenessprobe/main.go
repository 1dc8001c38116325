// Command livenessprobe stands in for the livenessprobe sidecar in make
// e2e, whose module this test machine cannot fetch: CSI Probe behind
// /healthz, with the upstream flags deploy/kubernetes passes. Production
// uses registry.k8s.io/sig-storage/livenessprobe.
package main

import (
	"context"
	"flag"
	"log"
	"net/http"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	address := flag.String("csi-address", "/run/csi/socket", "the CSI socket")
	port := flag.String("health-port", "9808", "TCP port of /healthz on all addresses")
	endpoint := flag.String("http-endpoint", "", "host:port of /healthz; overrides --health-port")
	timeout := flag.Duration("probe-timeout", time.Second, "timeout of one Probe")
	flag.Int("v", 0, "accepted for compatibility")
	flag.Parse()
	conn, err := grpc.NewClient("unix://"+*address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	identity := csi.NewIdentityClient(conn)
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *timeout)
		defer cancel()
		resp, err := identity.Probe(ctx, &csi.ProbeRequest{})
		switch {
		case err != nil:
			http.Error(w, err.Error(), http.StatusInternalServerError)
		case resp.GetReady() != nil && !resp.GetReady().GetValue():
			http.Error(w, "driver not ready", http.StatusInternalServerError)
		default:
			_, _ = w.Write([]byte("ok"))
		}
	})
	listen := *endpoint
	if listen == "" {
		listen = ":" + *port
	}
	log.Printf("serving /healthz on %s, probing %s", listen, *address)
	log.Fatal(http.ListenAndServe(listen, nil))
}
