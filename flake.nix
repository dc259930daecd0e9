{
  description = "messaging-proxy: gRPC proxy in front of RabbitMQ (Effect 4)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in {
      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.nodejs_22 pkgs.rabbitmq-server pkgs.buf pkgs.openssl
            # The compatibility tests' third-party clients (test/support/python.ts).
            pkgs.protobuf
            (pkgs.python3.withPackages (ps: [ ps.grpcio ps.pika ps.protobuf ]))
          ];
          shellHook = ''
            export TEST_PYTHON=$(command -v python3)
            export RABBITMQ_MNESIA_BASE=$PWD/.rabbitmq/mnesia RABBITMQ_LOG_BASE=$PWD/.rabbitmq/log
            echo "messaging-proxy dev shell: node $(node --version); start a broker with 'rabbitmq-server -detached'"
          '';
        };
      });
    };
}
