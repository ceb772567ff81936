// containerd's containerd.io/snapshot/max-size label against thinstackd: a root prepared with it
// has a filesystem of that size, a child is grown to it and keeps its parent's files, and a
// size smaller than the parent's is InvalidArgument. Run by scripts/containerd-suite with the
// suite, on the same daemon.
package thinstacksuite

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
)

const maxSizeLabel = "containerd.io/snapshot/max-size"

func withMaxSize(size string) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{maxSizeLabel: size})
}

// mounted mounts `mounts`, runs `f` on the mount point, and unmounts.
func mounted(t *testing.T, mounts []mount.Mount, f func(dir string)) {
	t.Helper()
	dir := t.TempDir()
	if err := mount.All(mounts, dir); err != nil {
		t.Fatalf("mounting %v: %v", mounts, err)
	}
	defer func() {
		if err := mount.UnmountAll(dir, 0); err != nil {
			t.Errorf("unmounting %s: %v", dir, err)
		}
	}()
	f(dir)
}

// filesystemBytes is the size of the filesystem mounted at `dir`.
func filesystemBytes(t *testing.T, dir string) uint64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatalf("statfs %s: %v", dir, err)
	}
	return st.Blocks * uint64(st.Bsize)
}

func TestMaxSizeLabel(t *testing.T) {
	conn := dial(t)
	defer conn.Close()
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thinstack")
	ctx := namespaces.WithNamespace(context.Background(), "max-size")
	const mib = 1 << 20

	rootMounts, err := sn.Prepare(ctx, "root", "", withMaxSize("536870912"))
	if err != nil {
		t.Fatalf("prepare a 512 MiB root: %v", err)
	}
	mounted(t, rootMounts, func(dir string) {
		if got := filesystemBytes(t, dir); got < 400*mib || got > 512*mib {
			t.Errorf("a root prepared with max-size 512 MiB has a filesystem of %d MiB", got/mib)
		}
		if err := os.WriteFile(filepath.Join(dir, "hello"), []byte("from the root"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	if err := sn.Commit(ctx, "base", "root"); err != nil {
		t.Fatalf("commit: %v", err)
	}

	_, err = sn.Prepare(ctx, "small", "base", withMaxSize("268435456"))
	if !errdefs.IsInvalidArgument(err) {
		t.Errorf("a child smaller than its parent: want InvalidArgument, got %v", err)
	}
	_, err = sn.Prepare(ctx, "garbled", "base", withMaxSize("1G"))
	if !errdefs.IsInvalidArgument(err) {
		t.Errorf("a size that is not decimal bytes: want InvalidArgument, got %v", err)
	}

	bigMounts, err := sn.Prepare(ctx, "big", "base", withMaxSize("1073741824"))
	if err != nil {
		t.Fatalf("prepare a 1 GiB child: %v", err)
	}
	mounted(t, bigMounts, func(dir string) {
		if got := filesystemBytes(t, dir); got < 900*mib || got > 1024*mib {
			t.Errorf("a child grown to max-size 1 GiB has a filesystem of %d MiB", got/mib)
		}
		data, err := os.ReadFile(filepath.Join(dir, "hello"))
		if err != nil || string(data) != "from the root" {
			t.Errorf("the grown child lost its parent's file: %q, %v", data, err)
		}
	})
	for _, key := range []string{"big", "base"} {
		if err := sn.Remove(ctx, key); err != nil {
			t.Errorf("remove %s: %v", key, err)
		}
	}
}
