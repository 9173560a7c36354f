// Package v1alpha2 stands in for the CRI API package that Debian does not ship.
//
// The stargz snapshotter's resolver uses only AuthConfig from it; the CRI keychain and the
// containerd plugin (which need the whole gRPC API) are not built by our daemon.
package v1alpha2

// AuthConfig holds the credentials a CRI image pull carries, with the fields the resolver reads.
type AuthConfig struct {
	Username      string
	Password      string
	Auth          string
	ServerAddress string
	IdentityToken string
	RegistryToken string
}
