// Creates Azure Blob containers on Azurite (the Azure Storage emulator)
// with the official SDK, for the tests: tern itself never creates one.
// Usage: node azure-container.js <blob endpoint> <container>...
const { BlobServiceClient, StorageSharedKeyCredential } = require("@azure/storage-blob");
const [endpoint, ...containers] = process.argv.slice(2);
// Azurite's well-known development account (public, documented).
const account = "devstoreaccount1";
const key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const client = new BlobServiceClient(`${endpoint}/${account}`, new StorageSharedKeyCredential(account, key));
(async () => {
  for (const name of containers) {
    await client.getContainerClient(name).createIfNotExists();
  }
})().catch((e) => { console.error(`cannot create containers on ${endpoint}: ${e.message}`); process.exit(1); });
