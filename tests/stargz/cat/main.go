// Command cat prints files: a static binary for test images, which have no libc or shell.
package main

import "os"

func main() {
	for _, name := range os.Args[1:] {
		data, err := os.ReadFile(name)
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.Write(data)
	}
}
