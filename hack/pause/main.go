// pause: the process that holds a pod sandbox's namespaces. PID 1 of the sandbox: it reaps
// whatever is reparented to it and exits on SIGINT or SIGTERM. The dev cluster's
// containerd uses it as its sandbox image (registry.k8s.io's pause cannot be pulled here).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	children := make(chan os.Signal, 1)
	signal.Notify(children, syscall.SIGCHLD)
	for {
		select {
		case <-stop:
			os.Exit(0)
		case <-children:
			for {
				var status syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
		}
	}
}
