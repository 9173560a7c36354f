// Command containerd-stargz-grpc runs the stargz snapshotter as containerd's proxy snapshotter.
//
// It is built from Debian's stargz-snapshotter library, which ships no daemon. It reads only the
// configuration keys upstream's daemon reads, so what the tests prove with it holds for upstream's
// binary. Credentials come from the docker config keychain only: nodes read through the mirror,
// which authenticates upstream itself.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/stargz-snapshotter/fs"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/dockerconfig"
	"github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "unix socket of the gRPC server")
	configPath := flag.String("config", "/etc/containerd-stargz-grpc/config.toml", "TOML configuration (upstream's keys)")
	rootDir := flag.String("root", "/var/lib/containerd-stargz-grpc", "the snapshotter's own state and mounts")
	logLevel := flag.String("log-level", "info", "trace, debug, info, warn or error")
	flag.Parse()

	level, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: bad --log-level %q\n", *logLevel)
		os.Exit(2)
	}
	logrus.SetLevel(level)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var config service.Config
	tree, err := toml.LoadFile(*configPath)
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("cannot read config %q", *configPath)
	}
	if err := tree.Unmarshal(&config); err != nil {
		log.G(ctx).WithError(err).Fatalf("cannot parse config %q", *configPath)
	}
	if err := service.Supported(*rootDir); err != nil {
		log.G(ctx).WithError(err).Fatal("the stargz snapshotter cannot run here")
	}

	snapshotter, err := service.NewStargzSnapshotterService(ctx, *rootDir, &config,
		service.WithCredsFuncs(dockerconfig.NewDockerconfigKeychain(ctx)),
		service.WithFilesystemOptions(
			fs.WithMetricsLogLevel(logrus.InfoLevel),
			fs.WithMetadataStore(memorymetadata.NewReader),
		))
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot start the snapshotter")
	}

	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(snapshotter))
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		log.G(ctx).WithError(err).Fatal("cannot make the socket's folder")
	}
	if err := os.RemoveAll(*address); err != nil {
		log.G(ctx).WithError(err).Fatal("cannot remove a stale socket")
	}
	listener, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("cannot listen on %q", *address)
	}
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()

	// Unlike upstream (which keeps its mounts on SIGTERM for a restart), both signals close the
	// snapshotter here: whoever stops this daemon expects its FUSE layers gone with it.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, unix.SIGINT, unix.SIGTERM)
	select {
	case s := <-signals:
		log.G(ctx).Infof("got %v, closing", s)
	case err := <-served:
		log.G(ctx).WithError(err).Error("gRPC server stopped")
	}
	server.Stop()
	if err := snapshotter.Close(); err != nil {
		log.G(ctx).WithError(err).Error("closing the snapshotter")
	}
}
