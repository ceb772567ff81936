// containerd's own snapshotter test suite (snapshots/testsuite, containerd 1.6.20 as Debian
// packages it) against thinstackd's snapshot service, through containerd's gRPC proxy
// client: the code path containerd itself uses for a `[proxy_plugins]` snapshotter.
//
// Run by scripts/containerd-suite, as root on a kernel with dm-thin (the suite mounts what the
// snapshotter returns). THINSTACK_CONTAINERD_SOCKET names thinstackd's containerd socket.
//
// The suite runs its subtests in parallel, each on a "new" snapshotter, and several use the
// same fixed keys ("c1", "a1", "reuse-1", ...). Each subtest therefore gets a containerd
// namespace of its own, which thinstack keeps as its own key space; its cleanup removes what
// the subtest left and checks that the namespace is empty.
package thinstacksuite

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

// dial connects to thinstackd's containerd socket (THINSTACK_CONTAINERD_SOCKET).
func dial(t *testing.T) *grpc.ClientConn {
	socket := os.Getenv("THINSTACK_CONTAINERD_SOCKET")
	if socket == "" {
		t.Fatal("THINSTACK_CONTAINERD_SOCKET is not set; run scripts/containerd-suite")
	}
	conn, err := grpc.Dial("unix://"+socket, grpc.WithInsecure())
	if err != nil {
		t.Fatalf("connecting to %s: %v", socket, err)
	}
	return conn
}

func TestThinstackSnapshotter(t *testing.T) {
	conn := dial(t)
	// Not deferred: the suite's subtests are parallel, so they run after this function returns.
	t.Cleanup(func() { conn.Close() })
	var subtests int64
	testsuite.SnapshotterSuite(t, "thinstack", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		ns := fmt.Sprintf("suite-%d", atomic.AddInt64(&subtests, 1))
		s := &namespaced{
			inner: proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thinstack"),
			ns:    ns,
		}
		return s, s.removeAll, nil
	})
}

// namespaced runs every call of the suite's snapshotter in its own containerd namespace.
type namespaced struct {
	inner snapshots.Snapshotter
	ns    string
}

func (s *namespaced) ctx(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, s.ns)
}

func (s *namespaced) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	return s.inner.Stat(s.ctx(ctx), key)
}

func (s *namespaced) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	return s.inner.Update(s.ctx(ctx), info, fieldpaths...)
}

func (s *namespaced) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	return s.inner.Usage(s.ctx(ctx), key)
}

func (s *namespaced) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	return s.inner.Mounts(s.ctx(ctx), key)
}

func (s *namespaced) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.inner.Prepare(s.ctx(ctx), key, parent, opts...)
}

func (s *namespaced) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.inner.View(s.ctx(ctx), key, parent, opts...)
}

func (s *namespaced) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	return s.inner.Commit(s.ctx(ctx), name, key, opts...)
}

func (s *namespaced) Remove(ctx context.Context, key string) error {
	return s.inner.Remove(s.ctx(ctx), key)
}

func (s *namespaced) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.inner.Walk(s.ctx(ctx), fn, filters...)
}

func (s *namespaced) Close() error {
	return s.inner.Close()
}

// removeAll removes the namespace's snapshots, children first, and fails if any is left.
func (s *namespaced) removeAll() error {
	ctx := namespaces.WithNamespace(context.Background(), s.ns)
	for {
		infos := map[string]snapshots.Info{}
		if err := s.inner.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
			infos[info.Name] = info
			return nil
		}); err != nil {
			return fmt.Errorf("listing namespace %s: %w", s.ns, err)
		}
		if len(infos) == 0 {
			return nil
		}
		parents := map[string]bool{}
		for _, info := range infos {
			parents[info.Parent] = true
		}
		removed := 0
		for name := range infos {
			if parents[name] {
				continue
			}
			if err := s.inner.Remove(ctx, name); err != nil {
				return fmt.Errorf("removing %q from namespace %s: %w", name, s.ns, err)
			}
			removed++
		}
		if removed == 0 {
			return fmt.Errorf("namespace %s: %d snapshots left, none removable", s.ns, len(infos))
		}
	}
}
