"""The registry protocol: OCI media types, digests, errors and descriptors; tokens; Azure AD."""
